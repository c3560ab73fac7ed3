"""Feature datasets for the tokenizer, read straight from the float16 memmaps of ``prepare_emb/``.

Nothing here loads a whole feature array: every batch gathers its rows from the memmap (sorted
row order, so reads stay close to sequential) and casts only that batch to float32. That keeps
memory flat for COCO-size and larger image sets.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from avg.train.batches import shard_batches
from avg.core.io import InputError


class CaptionRows:
    """Caption rows per image in CSR form (``flat[offsets[i]:offsets[i + 1]]`` for image i):
    two int64 arrays instead of a million small Python lists."""

    def __init__(self, offsets: np.ndarray, flat: np.ndarray) -> None:
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.flat = np.asarray(flat, dtype=np.int64)

    @classmethod
    def from_lists(cls, lists: Sequence) -> "CaptionRows":
        counts = np.array([len(c) for c in lists], dtype=np.int64)
        flat = np.concatenate([np.asarray(c, dtype=np.int64) for c in lists]) if len(lists) else np.zeros(0, np.int64)
        return cls(np.concatenate([[0], np.cumsum(counts)]), flat)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]


def training_rows(emb, splits: Sequence[str], emb_path: str = "prepare_emb/index.json"):
    """Image rows of ``splits`` and (as ``CaptionRows`` aligned with them) each image's caption
    rows whose own split is also in ``splits`` -- so no caption of a val/test image (or a
    mislabelled caption) enters training."""
    splits = set(splits)
    image_rows = np.array([i for i, im in enumerate(emb.images) if im.get("split") in splits], dtype=np.int64)
    if image_rows.size == 0:
        found = sorted({str(im.get("split")) for im in emb.images})
        raise InputError(f"{emb_path}: no images in split(s) {sorted(splits)} (splits present: {found})")
    n_img = len(emb.images)
    position = np.full(n_img, -1, dtype=np.int64)  # image row -> index in image_rows
    position[image_rows] = np.arange(len(image_rows))
    cap_img = np.fromiter((c["image_row"] for c in emb.captions), dtype=np.int64, count=len(emb.captions))
    cap_ok = np.fromiter((c.get("split") in splits for c in emb.captions), dtype=bool, count=len(emb.captions))
    kept = np.nonzero(cap_ok & (position[cap_img] >= 0))[0]
    owner = position[cap_img[kept]]
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=len(image_rows))
    return image_rows, CaptionRows(np.concatenate([[0], np.cumsum(counts)]), kept[order])


def passthrough_collate(batch):
    """The dataset's ``__getitems__`` already returns a collated batch."""
    return batch


class FeatureDataset(Dataset):
    """Items are ``(image_row, caption_row)`` pairs (caption_row -1: no caption for the
    alignment loss); ``__getitems__`` turns a list of pairs into one float32 batch."""

    def __init__(self, image_features: np.ndarray, text_features: Optional[np.ndarray] = None) -> None:
        self.image_features = image_features
        self.text_features = text_features

    def __len__(self) -> int:
        return int(self.image_features.shape[0])

    def __getstate__(self) -> dict:
        """Pickle memmaps (spawned DataLoader workers) as their file name, not their contents."""
        return {k: _MemmapRef(v.filename) if isinstance(v, np.memmap) and v.filename else v for k, v in self.__dict__.items()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({k: np.load(v.path, mmap_mode="r") if isinstance(v, _MemmapRef) else v for k, v in state.items()})

    def __getitem__(self, pair):
        return self.__getitems__([pair])

    def __getitems__(self, pairs: Sequence) -> dict:
        img = np.fromiter((p[0] for p in pairs), dtype=np.int64, count=len(pairs))
        cap = np.fromiter((p[1] for p in pairs), dtype=np.int64, count=len(pairs))
        out = {"image_row": torch.from_numpy(img), "image": gather_rows(self.image_features, img)}
        has_text = cap >= 0
        text = torch.zeros_like(out["image"])
        if self.text_features is not None and has_text.any():
            text[torch.from_numpy(has_text)] = gather_rows(self.text_features, cap[has_text])
        out["text"] = text
        out["text_mask"] = torch.from_numpy(has_text & (self.text_features is not None))
        return out


class _MemmapRef:
    def __init__(self, path: str) -> None:
        self.path = path


def gather_rows(features: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """float32 copy of ``features[rows]`` (any order), reading the memmap in sorted row order."""
    order = np.argsort(rows, kind="stable")
    block = np.asarray(features[rows[order]], dtype=np.float32)
    out = np.empty_like(block)
    out[order] = block
    return torch.from_numpy(out)


class FeatureBatchSampler(Sampler):
    """Seeded batches of ``(image_row, caption_row)``: each epoch a fresh permutation of the
    images and ONE caption drawn per image, both from ``np.random.default_rng([seed, epoch])`` --
    independent of global RNG state, so a resumed run sees the same batches and can skip the ones
    it already saw (``set_epoch(epoch, skip_batches)``).

    Over ``world_size`` processes, process ``rank`` takes every ``world_size``-th batch of the
    epoch's list (``batch_size`` is per process); the list is padded so that every process gets
    the same number of full batches (the last batch is completed, then whole batches are repeated,
    from the start of the epoch's order), so collective ops never see unequal shapes.
    """

    def __init__(
        self,
        image_rows: np.ndarray,
        captions,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for {world_size} processes")
        self.image_rows = np.asarray(image_rows, dtype=np.int64)
        if not isinstance(captions, CaptionRows):
            captions = CaptionRows.from_lists(captions)
        if len(captions) != len(self.image_rows):
            raise ValueError("captions must have one entry per image row")
        self.counts, self.offsets, self.flat = captions.counts, captions.offsets, captions.flat
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank, self.world = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip_batches)

    def batches_per_epoch(self) -> int:
        """Batches each process gets in a whole epoch (before ``skip_batches``)."""
        n = len(self.image_rows)
        total = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return -(-total // self.world)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.skip)

    def epoch_pairs(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.image_rows)
        perm = rng.permutation(n) if self.shuffle else np.arange(n)
        pick = np.floor(rng.random(n) * self.counts).astype(np.int64)  # one caption per image
        caps = np.full(n, -1, dtype=np.int64)
        has = self.counts > 0
        caps[has] = self.flat[self.offsets[:-1][has] + pick[has]]
        return self.image_rows[perm], caps[perm]

    def __iter__(self) -> Iterator[list]:
        imgs, caps = self.epoch_pairs()
        n, b = len(imgs), self.batch_size
        if self.world > 1 and n:  # full batches only: the dead-code resets gather codes of one shape
            take = np.arange(self.batches_per_epoch() * self.world * b) % n
            imgs, caps, n = imgs[take], caps[take], len(take)
        starts = list(range(0, n - n % b if self.drop_last else n, b))
        for i in shard_batches(starts, self.rank, self.world)[self.skip:]:
            yield list(zip(imgs[i : i + b].tolist(), caps[i : i + b].tolist()))


def iter_feature_batches(features: np.ndarray, batch_size: int, rows: Optional[np.ndarray] = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Consecutive float32 batches of ``features`` (or of ``features[rows]``): (offset, batch)."""
    n = features.shape[0] if rows is None else len(rows)
    for s in range(0, n, batch_size):
        if rows is None:
            block = torch.from_numpy(np.asarray(features[s : s + batch_size], dtype=np.float32))
        else:
            block = gather_rows(features, rows[s : s + batch_size])
        yield s, block
