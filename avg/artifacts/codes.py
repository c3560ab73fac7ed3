"""The ``generate_codes/`` artifact: every image's voken ids, read and written in one place.

  generate_codes/codes.json    {"num_levels": M, "codebook_size": N, "shared_codebook": bool,
                       "code_len": L, "disambiguation": bool, "disambiguation_size": K,
                       "tie_rule": str, "encoder": {...},
                       "images": {image_id: {"code": [L ints], "split": str}}}
  generate_codes/codebook.npy  float32 [n_books, N, latent_dim] (n_books = 1 for a shared codebook)
  generate_codes/stats.json    collision rate, codebook usage / perplexity per level, per split

Positions 0..M-1 of a code are voken ids in [0, N); when ``disambiguation`` is true, position M
is the image's index within its group of images sharing the same M vokens, in [0, K).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from avg.core.io import InputError, atomic_open, read_json

CODES = "codes.json"
CODEBOOK = "codebook.npy"
STATS = "stats.json"
_HEADER_KEYS = ("num_levels", "codebook_size", "shared_codebook", "code_len", "disambiguation", "disambiguation_size", "tie_rule", "encoder")
#: written when present: ``layout`` -- {mode, levels, position, entries, score} of layout vokens (avg.models.layout);
#: ``evidence_levels`` -- the code positions the retriever scores over their level's alphabet (avg.search.code_index)
_OPTIONAL_HEADER_KEYS = ("layout", "evidence_levels")


@dataclass
class Codes:
    num_levels: int
    codebook_size: int
    shared_codebook: bool
    code_len: int
    disambiguation: bool
    disambiguation_size: int
    tie_rule: str
    encoder: dict
    images: dict  # image_id -> {"code": [ints], "split": str}
    path: Optional[Path] = field(default=None, repr=False)
    layout: Optional[dict] = None  # {mode, levels, position, entries, score} of the layout vokens
    evidence_levels: list = field(default_factory=list)  # positions scored over their level's alphabet

    @property
    def num_books(self) -> int:
        return 1 if self.shared_codebook else self.num_levels

    def image_ids(self, split: Optional[str] = None) -> list:
        return [i for i, rec in self.images.items() if split is None or rec["split"] == split]

    def code(self, image_id: str) -> tuple:
        return tuple(self.images[image_id]["code"])

    def split(self, image_id: str) -> str:
        return self.images[image_id]["split"]

    def position_size(self, position: int) -> int:
        """How many distinct values position ``position`` of a code can take."""
        if 0 <= position < self.num_levels:
            return self.codebook_size
        if self.disambiguation and position == self.num_levels:
            return self.disambiguation_size
        raise IndexError(f"position {position} outside 0..{self.code_len - 1}")

    def images_by_code(self, split: Optional[str] = None) -> dict:
        """code tuple -> image ids with that code (one each unless collisions were allowed)."""
        out: dict = {}
        for image_id in self.image_ids(split):
            out.setdefault(self.code(image_id), []).append(image_id)
        return out


def load_codes(codes_dir: str | os.PathLike) -> Codes:
    """Read and validate ``codes_dir/codes.json``; any inconsistency is an InputError that names
    the file and the image id."""
    path = Path(codes_dir) / CODES
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object")
    missing = [k for k in (*_HEADER_KEYS, "images") if k not in raw]
    if missing:
        raise InputError(f"{path}: missing key(s) {missing}")
    try:
        m, n, code_len, k = (int(raw[x]) for x in ("num_levels", "codebook_size", "code_len", "disambiguation_size"))
    except (TypeError, ValueError):
        raise InputError(f"{path}: num_levels, codebook_size, code_len, disambiguation_size must be integers") from None
    disamb = bool(raw["disambiguation"])
    if m < 1 or n < 1 or code_len != m + int(disamb) or (disamb and k < 1):
        raise InputError(f"{path}: inconsistent header (num_levels={m}, codebook_size={n}, code_len={code_len}, disambiguation={disamb}, disambiguation_size={k})")
    if not isinstance(raw["images"], dict):
        raise InputError(f"{path}: 'images' must map image ids to {{code, split}}")
    for image_id, rec in raw["images"].items():
        code = rec.get("code") if isinstance(rec, dict) else None
        if not isinstance(code, list) or len(code) != code_len:
            raise InputError(f"{path}: image {image_id!r}: code must be a list of {code_len} integers, got {code!r}")
        if not isinstance(rec.get("split"), str):
            raise InputError(f"{path}: image {image_id!r}: missing split")
        for pos, v in enumerate(code):
            hi = n if pos < m else k
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < hi:
                raise InputError(f"{path}: image {image_id!r}: code position {pos} = {v!r} outside 0..{hi - 1}")
    evidence = raw.get("evidence_levels") or []
    if not isinstance(evidence, list) or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < m
                                             for d in evidence) or len(set(evidence)) != len(evidence):
        raise InputError(f"{path}: evidence_levels must be a list of distinct levels in 0..{m - 1}, got {evidence!r}")
    return Codes(m, n, bool(raw["shared_codebook"]), code_len, disamb, k, str(raw["tie_rule"]), dict(raw["encoder"] or {}),
                 raw["images"], path, raw.get("layout"), list(evidence))


def load_codebook(codes_dir: str | os.PathLike, codes: Optional[Codes] = None) -> np.ndarray:
    """The voken embeddings float32 [n_books, N, latent_dim] (for the LM's new token rows)."""
    path = Path(codes_dir) / CODEBOOK
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        book = np.load(path)
    except ValueError as e:
        raise InputError(f"{path}: not a .npy array ({e})") from None
    if book.ndim != 3:
        raise InputError(f"{path}: expected [n_books, codebook_size, dim], got shape {book.shape}")
    if codes is not None and book.shape[:2] != (codes.num_books, codes.codebook_size):
        raise InputError(f"{path}: shape {book.shape} does not match {codes.path} (n_books={codes.num_books}, codebook_size={codes.codebook_size})")
    return book.astype(np.float32, copy=False)


def write_codes_json(path: str | os.PathLike, header: dict, entries: Iterable[tuple]) -> int:
    """Stream ``codes.json`` atomically, one image per line, from ``(image_id, code, split)``
    tuples -- no million-entry dict is built in memory. Returns the number of images."""
    n = 0
    with atomic_open(path) as f:
        f.write("{\n")
        for key in (*_HEADER_KEYS, *(k for k in _OPTIONAL_HEADER_KEYS if header.get(k) is not None)):
            f.write(f"  {json.dumps(key)}: {json.dumps(header[key], ensure_ascii=False)},\n")
        f.write('  "images": {')
        for image_id, code, split in entries:
            sep = "\n" if n == 0 else ",\n"
            f.write(f"{sep}    {json.dumps(str(image_id), ensure_ascii=False)}: {{\"code\": {json.dumps([int(v) for v in code])}, \"split\": {json.dumps(split, ensure_ascii=False)}}}")
            n += 1
        f.write("\n  }\n}\n")
    return n


def collision_stats(codes: np.ndarray, codebook_size: int) -> dict:
    """Collision rate (1 - unique codes / images), images in colliding groups, largest group, and
    per-level codebook usage (fraction of N used) and perplexity (exp of the code entropy)."""
    n = int(codes.shape[0])
    if n == 0:
        return {"num_images": 0, "collision_rate": 0.0, "num_colliding_images": 0, "largest_group": 0, "levels": []}
    _, counts = np.unique(codes, axis=0, return_counts=True)
    levels = []
    for d in range(codes.shape[1]):
        hist = np.bincount(codes[:, d], minlength=codebook_size).astype(np.float64)
        p = hist[hist > 0] / n
        levels.append({"usage": float((hist > 0).sum() / codebook_size), "perplexity": float(np.exp(-(p * np.log(p)).sum()))})
    return {
        "num_images": n,
        "collision_rate": float(1.0 - len(counts) / n),
        "num_colliding_images": int(counts[counts > 1].sum()),
        "largest_group": int(counts.max()),
        "levels": levels,
    }
