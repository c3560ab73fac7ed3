"""The ``prepare_emb/`` artifact: CLIP feature arrays plus an index, read memory-mapped.

Layout (written by ``avg.stages.prepare_emb``):
  prepare_emb/image_features.npy  [n_images, dim]   row i <-> index["images"][i]
  prepare_emb/text_features.npy   [n_captions, dim] row j <-> index["captions"][j]
  prepare_emb/image_grid.npy      [n_images, g * g, width]  optional (``--image-grid g``): the ViT's patch
                          tokens average-pooled to a g x g grid, row-major; index["encoder"]["grid"] = g
  prepare_emb/index.json          {"encoder": {backend, model, pretrained, dim, normalized, dtype},
                           "images": [{image_id, file, split}],
                           "captions": [{text, image_row, split}],
                           "skipped_images": [{image_id, file, error}],
                           "truncated_captions": n (cut to the text encoder's context), ...}
``encoder.normalized`` records whether rows were L2-normalised by the writer; readers never guess.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from avg.core.io import InputError, atomic_dir, read_json, save_npy, write_json

IMAGE_FEATURES = "image_features.npy"
TEXT_FEATURES = "text_features.npy"
IMAGE_GRID = "image_grid.npy"
INDEX = "index.json"


@dataclass
class Embeddings:
    image_features: np.ndarray  # memory-mapped when loaded with mmap=True
    text_features: np.ndarray
    index: dict
    image_grid: Optional[np.ndarray] = None  # [n_images, g * g, width] when written with --image-grid

    @property
    def images(self) -> list:
        return self.index["images"]

    @property
    def captions(self) -> list:
        return self.index["captions"]

    @property
    def dim(self) -> int:
        return int(self.image_features.shape[1])

    @property
    def normalized(self) -> bool:
        return bool(self.index["encoder"].get("normalized", False))

    def image_rows(self, split: Optional[str] = None) -> np.ndarray:
        if split is None:
            return np.arange(len(self.images))
        return np.array([i for i, im in enumerate(self.images) if im["split"] == split], dtype=np.int64)

    def caption_rows(self, split: Optional[str] = None) -> np.ndarray:
        if split is None:
            return np.arange(len(self.captions))
        return np.array([j for j, c in enumerate(self.captions) if c["split"] == split], dtype=np.int64)

    def caption_row_map(self) -> dict:
        """(image_id, caption text) -> caption row (the first, if an image repeats a caption)."""
        ids = [str(im["image_id"]) for im in self.images]
        out: dict = {}
        for j, c in enumerate(self.captions):
            out.setdefault((ids[c["image_row"]], c["text"]), j)
        return out

    def captions_per_image(self) -> list:
        """For each image row, the caption rows that describe it (for the alignment loss)."""
        out: list = [[] for _ in self.images]
        for j, c in enumerate(self.captions):
            out[c["image_row"]].append(j)
        return out


def load_emb(emb_dir: str | os.PathLike, mmap: bool = True) -> Embeddings:
    emb_dir = Path(emb_dir)
    if not emb_dir.is_dir():
        raise InputError(f"{emb_dir}: feature directory not found (run scripts/prepare_emb.sh first)")
    index = read_json(emb_dir / INDEX)
    for key in ("encoder", "images", "captions"):
        if key not in index:
            raise InputError(f"{emb_dir / INDEX}: missing key {key!r}")
    mode = "r" if mmap else None
    arrays = {}
    for name in (IMAGE_FEATURES, TEXT_FEATURES):
        path = emb_dir / name
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        try:
            arrays[name] = np.load(path, mmap_mode=mode)
        except ValueError as e:
            raise InputError(f"{path}: not a .npy array ({e})") from None
    img, txt = arrays[IMAGE_FEATURES], arrays[TEXT_FEATURES]
    if img.ndim != 2 or txt.ndim != 2:
        raise InputError(f"{emb_dir}: feature arrays must be 2-D, got {img.shape} and {txt.shape}")
    if img.shape[0] != len(index["images"]):
        raise InputError(f"{emb_dir / IMAGE_FEATURES}: {img.shape[0]} rows but {emb_dir / INDEX} lists {len(index['images'])} images")
    if txt.shape[0] != len(index["captions"]):
        raise InputError(f"{emb_dir / TEXT_FEATURES}: {txt.shape[0]} rows but {emb_dir / INDEX} lists {len(index['captions'])} captions")
    if img.shape[1] != txt.shape[1]:
        raise InputError(f"{emb_dir}: image dim {img.shape[1]} != text dim {txt.shape[1]}")
    for j, c in enumerate(index["captions"]):
        if not 0 <= c["image_row"] < img.shape[0]:
            raise InputError(f"{emb_dir / INDEX}: captions[{j}] points at image row {c['image_row']}, outside 0..{img.shape[0] - 1}")
    grid = None
    if (emb_dir / IMAGE_GRID).is_file():
        try:
            grid = np.load(emb_dir / IMAGE_GRID, mmap_mode=mode)
        except ValueError as e:
            raise InputError(f"{emb_dir / IMAGE_GRID}: not a .npy array ({e})") from None
        if grid.ndim != 3 or grid.shape[0] != img.shape[0]:
            raise InputError(f"{emb_dir / IMAGE_GRID}: shape {grid.shape}, expected [{img.shape[0]}, cells, width]")
    return Embeddings(img, txt, index, grid)


def save_emb(
    out_dir: str | os.PathLike,
    image_features: np.ndarray,
    text_features: np.ndarray,
    images: Sequence[dict],
    captions: Sequence[dict],
    encoder: dict,
    extra: Optional[dict[str, Any]] = None,
    image_grid: Optional[np.ndarray] = None,
) -> Path:
    """Write a complete ``prepare_emb/`` directory atomically (built under a temp name, then renamed)."""
    if image_features.shape[0] != len(images) or text_features.shape[0] != len(captions):
        raise ValueError("save_emb: row counts disagree with the index")
    if image_grid is not None and (image_grid.ndim != 3 or image_grid.shape[0] != len(images)):
        raise ValueError(f"save_emb: image_grid of shape {image_grid.shape} for {len(images)} images")
    grid = {"grid": int(round(image_grid.shape[1] ** 0.5)), "grid_width": int(image_grid.shape[2])} if image_grid is not None else {}
    index = {"encoder": {**encoder, "dim": int(image_features.shape[1]), "dtype": str(image_features.dtype), **grid},
             "images": list(images), "captions": list(captions)}
    index.setdefault("skipped_images", [])
    if extra:
        index.update(extra)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_npy(image_features, tmp / IMAGE_FEATURES)
        save_npy(text_features, tmp / TEXT_FEATURES)
        if image_grid is not None:
            save_npy(image_grid, tmp / IMAGE_GRID)
        write_json(index, tmp / INDEX, indent=None)
    return out_dir
