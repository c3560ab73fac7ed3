"""Image tokens for the reranker: each image as a short sequence of ``<img_NNNNN>`` tokens.

SEED-LLaMA's vocabulary already holds 8,192 image tokens ``<img_00000>`` ... ``<img_08191>``.
The reranker shows every candidate image to the LM with those names, so one mapping serves
SEED-LLaMA (the tokens exist) and any other LLaMA-family model (the same tokens are added; see
avg.reranker.lm_setup.ensure_image_tokens).

The mapping from a voken to an image-token index is the order of ``VokenVocab.tokens()``:

* shared codebook (the paper's setting): level value k -> k, at every level;
  disambiguation value j -> N + j;
* one codebook per level: level d value k -> d * N + k; disambiguation j -> M * N + j;
* optional richer tokens (``--rich-levels R``): a residual k-means code of the same CLIP image
  features, R levels of K entries each, after the vokens: level r value k -> base + r * K + k.

i.e. ``index = offset[position] + value``. ``check_fits`` refuses a mapping whose largest index
does not fit the model's image-token block (8,192 for SEED-LLaMA).

The richer code carries more of the image feature than the retriever's 4-level voken code (which
collides for a quarter of the demo images), so the reranker can separate candidates the
retriever cannot; it is fitted on TRAIN images only and applied to every image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from avg.core.io import InputError, read_json

SEED_NUM_IMAGE_TOKENS = 8192
TOKEN_FORMAT = "<img_{:05d}>"
TOKENS_FILE = "image_tokens.json"
VECTORS_FILE = "token_vectors.npy"


def image_token(index: int) -> str:
    return TOKEN_FORMAT.format(int(index))


@dataclass
class ImageTokenMap:
    """Code position -> block of image-token indices (``index = offset + value``)."""
    offsets: list[int]                 # per position of the full per-image sequence
    sizes: list[int]                   # alphabet size per position
    voken_positions: int               # leading positions that are the retriever's vokens
    rich_levels: int = 0               # trailing positions from the residual k-means code
    rich_size: int = 0
    notes: dict = field(default_factory=dict)

    @classmethod
    def from_codes_meta(cls, meta: Mapping, *, rich_levels: int = 0, rich_size: int = 0) -> "ImageTokenMap":
        """The documented mapping (module docstring) for a codes.json header."""
        m, n = int(meta["num_levels"]), int(meta["codebook_size"])
        shared = bool(meta.get("shared_codebook", True))
        disamb = bool(meta.get("disambiguation", False))
        k = int(meta.get("disambiguation_size", 0) or 0)
        offsets = [0 if shared else d * n for d in range(m)]
        sizes = [n] * m
        base = n if shared else m * n
        if disamb:
            offsets.append(base)
            sizes.append(k)
            base += k
        voken_positions = len(offsets)
        for r in range(rich_levels):
            offsets.append(base + r * rich_size)
            sizes.append(rich_size)
        return cls(offsets, sizes, voken_positions, rich_levels, rich_size)

    @property
    def num_tokens(self) -> int:
        """Image tokens the mapping uses (largest index + 1)."""
        return max(o + s for o, s in zip(self.offsets, self.sizes)) if self.offsets else 0

    @property
    def length(self) -> int:
        return len(self.offsets)

    def to_indices(self, code: Sequence[int], *, source: str = "codes") -> list[int]:
        if len(code) != self.length:
            raise InputError(f"{source}: code of length {len(code)}, the image-token map expects {self.length}")
        out = []
        for pos, (v, o, s) in enumerate(zip(code, self.offsets, self.sizes)):
            if not 0 <= int(v) < s:
                raise InputError(f"{source}: position {pos} value {v} outside 0..{s - 1}")
            out.append(o + int(v))
        return out

    def check_fits(self, capacity: int, *, model: str = "the model") -> None:
        """Bounds check: every index must name an existing image token of the model."""
        if self.num_tokens > capacity:
            raise InputError(f"{model}: the image-token map needs {self.num_tokens} image tokens "
                             f"(alphabet sizes {self.sizes}) but only {capacity} exist "
                             f"(<img_00000>..{image_token(capacity - 1)}); use fewer/smaller levels")

    def to_dict(self) -> dict:
        return {"offsets": self.offsets, "sizes": self.sizes, "voken_positions": self.voken_positions,
                "rich_levels": self.rich_levels, "rich_size": self.rich_size, "num_tokens": self.num_tokens,
                "token_format": TOKEN_FORMAT, **({"notes": self.notes} if self.notes else {})}

    @classmethod
    def from_dict(cls, d: Mapping, source: str = TOKENS_FILE) -> "ImageTokenMap":
        try:
            return cls([int(x) for x in d["offsets"]], [int(x) for x in d["sizes"]], int(d["voken_positions"]),
                       int(d.get("rich_levels", 0)), int(d.get("rich_size", 0)), dict(d.get("notes", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{source}: bad image-token map ({e!r})") from None


# ---------------------------------------------------------------------------- richer codes
@torch.no_grad()
def residual_kmeans_codes(features: np.ndarray, fit_rows: np.ndarray, *, levels: int, size: int,
                          iters: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Residual k-means: level r quantises what levels < r left. Fitted on ``fit_rows`` only (train
    images), applied to every row. Returns (codes [n, levels] int64, centroids [levels, size, d])."""
    from avg.models.kmeans import assign, kmeans

    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    residual = x.clone()
    codes = np.zeros((x.shape[0], levels), dtype=np.int64)
    books = []
    for r in range(levels):
        fit = kmeans(residual[torch.as_tensor(fit_rows)], size, iters=iters, seed=seed + r)
        labels, _ = assign(residual, fit.centroids)
        codes[:, r] = labels.numpy()
        residual -= fit.centroids[labels]
        books.append(fit.centroids.numpy())
    return codes, np.stack(books).astype(np.float32)


# ---------------------------------------------------------------------------- the artifact
@dataclass
class ImageTokens:
    """``convert_voken_to_seed/``: every image's image-token indices + the vectors that can seed the
    new tokens' embeddings (codebook vectors for vokens, k-means centroids for rich tokens)."""
    mapping: ImageTokenMap
    images: dict                       # image_id -> [indices]
    vectors: Optional[np.ndarray] = None   # [num_tokens, d]; rows of NaN have no vector

    def sequence(self, image_id: str) -> list[int]:
        try:
            return self.images[image_id]
        except KeyError:
            raise InputError(f"{TOKENS_FILE}: no image tokens for image {image_id!r}") from None

    def save(self, out_dir: str | os.PathLike, extra: Optional[dict] = None) -> None:
        from avg.core.io import save_npy, write_json

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.vectors is not None:
            save_npy(self.vectors.astype(np.float32), out_dir / VECTORS_FILE)
        write_json({"mapping": self.mapping.to_dict(), **(extra or {}), "images": self.images}, out_dir / TOKENS_FILE,
                   indent=None)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ImageTokens":
        path = Path(directory) / TOKENS_FILE
        raw = read_json(path)
        if not isinstance(raw, dict) or "mapping" not in raw or not isinstance(raw.get("images"), dict):
            raise InputError(f"{path}: expected {{mapping, images}}")
        mapping = ImageTokenMap.from_dict(raw["mapping"], source=str(path))
        for image_id, seq in raw["images"].items():
            if not isinstance(seq, list) or len(seq) != mapping.length or not all(
                    isinstance(v, int) and 0 <= v < mapping.num_tokens for v in seq):
                raise InputError(f"{path}: image {image_id!r}: expected {mapping.length} indices in "
                                 f"0..{mapping.num_tokens - 1}, got {seq!r}")
        vec_path = Path(directory) / VECTORS_FILE
        vectors = np.load(vec_path) if vec_path.is_file() else None
        return cls(mapping, raw["images"], vectors)


def build_image_tokens(codes, *, rich_features: Optional[np.ndarray] = None,
                       rich_image_ids: Optional[Sequence[str]] = None, rich_fit_ids: Sequence[str] = (),
                       rich_levels: int = 0, rich_size: int = 256, capacity: int = SEED_NUM_IMAGE_TOKENS,
                       seed: int = 0, iters: int = 20) -> ImageTokens:
    """Map every image's vokens (avg.retriever.data.CodesData) to image-token indices, optionally
    followed by ``rich_levels`` residual k-means tokens of ``rich_features`` (rows = rich_image_ids)."""
    mapping = ImageTokenMap.from_codes_meta(codes.meta, rich_levels=rich_levels, rich_size=rich_size)
    mapping.check_fits(capacity, model=f"image-token capacity {capacity}")
    src = "codes.json"
    seqs = {i: mapping.to_indices(rec["code"] + [0] * rich_levels, source=f"{src}: image {i!r}")[: mapping.voken_positions]
            for i, rec in codes.images.items()}
    vectors = None
    if codes.codebook is not None:
        cb = np.asarray(codes.codebook, dtype=np.float32)
        cb = cb[None] if cb.ndim == 2 else cb
        dim = cb.shape[-1]
        vectors = np.full((mapping.num_tokens, dim), np.nan, dtype=np.float32)
        for pos in range(int(codes.meta["num_levels"])):
            book = cb[0 if bool(codes.meta.get("shared_codebook", True)) else pos]
            vectors[mapping.offsets[pos]: mapping.offsets[pos] + mapping.sizes[pos]] = book
    if rich_levels:
        if rich_features is None or rich_image_ids is None:
            raise ValueError("rich_levels needs rich_features and rich_image_ids")
        row_of = {str(i): r for r, i in enumerate(rich_image_ids)}
        missing = [i for i in seqs if i not in row_of]
        if missing:
            raise InputError(f"prepare_emb/index.json: no features for image {missing[0]!r} (and {len(missing) - 1} more)")
        fit = np.array([row_of[i] for i in rich_fit_ids if i in row_of], dtype=np.int64)
        if len(fit) == 0:
            raise InputError("prepare_emb/index.json: no train images to fit the rich code on")
        rich, books = residual_kmeans_codes(rich_features, fit, levels=rich_levels, size=rich_size, iters=iters, seed=seed)
        base = mapping.voken_positions
        for i in seqs:
            seqs[i] = seqs[i] + [mapping.offsets[base + r] + int(rich[row_of[i], r]) for r in range(rich_levels)]
        mapping.notes["rich"] = (f"residual k-means over the CLIP image features, {rich_levels} levels x {rich_size}, "
                                 f"fitted on {len(fit)} train images (seed {seed})")
        dim = max(books.shape[-1], vectors.shape[1] if vectors is not None else 0)
        padded = np.full((mapping.num_tokens, dim), np.nan, dtype=np.float32)  # zero-padded to a common width
        if vectors is not None:
            padded[:, : vectors.shape[1]] = vectors
            padded[~np.isnan(vectors[:, 0]), vectors.shape[1]:] = 0.0
        for r in range(rich_levels):
            o = mapping.offsets[base + r]
            padded[o: o + rich_size] = 0.0
            padded[o: o + rich_size, : books.shape[-1]] = books[r]
        vectors = padded
    return ImageTokens(mapping, seqs, vectors)


__all__ = ["SEED_NUM_IMAGE_TOKENS", "TOKEN_FORMAT", "TOKENS_FILE", "ImageTokenMap", "ImageTokens", "image_token",
           "build_image_tokens", "residual_kmeans_codes"]
