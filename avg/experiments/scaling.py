"""Galleries larger than the real one for the efficiency benchmark, and the scale story's arithmetic.

Gallery scaling (sizes beyond the real images are synthetic, seeded by ``--seed``):

* real images first: the query split's images (the queries' own gallery), then the other real
  images in a seeded random order; a size <= the number of real images takes that prefix;
* each synthetic image copies a uniformly drawn real image's feature, adds Gaussian noise
  ``N(0, noise_std^2 / dim)`` per component (a noise vector of norm ~``--noise-std``) and is
  re-normalised to unit length;
* its code is drawn position by position from the real codes' per-position value frequencies
  (independently across positions) and rejected when it equals a real or earlier code, so every
  synthetic code is new and unique (real codes are kept as they are).

:func:`scale_rows` extrapolates each system's measured index bytes per image to 10M, 100M and 1B
images (labelled as extrapolated). Pure functions of arrays and a seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

@dataclass
class ScaledGallery:
    image_ids: list          # [n] str; synthetic ids are "synthetic_<j>"
    features: np.ndarray     # [n, dim] float32, unit rows
    codes: np.ndarray        # [n, L] int64
    num_real: int


def _code_keys(codes: np.ndarray, radix: np.ndarray) -> np.ndarray:
    """Mixed-radix int64 key of each code row (equal keys <=> equal codes)."""
    keys = np.zeros(len(codes), dtype=np.int64)
    for d in range(codes.shape[1]):
        keys = keys * int(radix[d]) + codes[:, d]
    return keys


def sample_new_codes(real_codes: np.ndarray, n: int, rng: np.random.Generator, *, max_rounds: int = 100) -> np.ndarray:
    """`n` distinct codes not among `real_codes`, each position drawn from the real per-position frequencies."""
    real_codes = np.asarray(real_codes, dtype=np.int64)
    if n <= 0:
        return np.zeros((0, real_codes.shape[1]), dtype=np.int64)
    length = real_codes.shape[1]
    radix = real_codes.max(axis=0) + 1
    if float(np.prod(radix.astype(np.float64))) >= 2.0 ** 62:
        raise ValueError("code space too large for int64 keys")
    probs = [np.bincount(real_codes[:, d], minlength=int(radix[d])) / len(real_codes) for d in range(length)]
    support = math.prod(int((p > 0).sum()) for p in probs)
    taken = np.unique(_code_keys(real_codes, radix))
    if support - len(taken) < n:
        raise ValueError(f"only {support - len(taken)} new codes can be drawn from the real per-position "
                         f"values, {n} requested")
    out, have = [], 0
    for _ in range(max_rounds):
        need = n - have
        m = int(need * 1.2) + 64
        cand = np.stack([rng.choice(len(p), size=m, p=p) for p in probs], axis=1).astype(np.int64)
        keys = _code_keys(cand, radix)
        fresh = ~np.isin(keys, taken)
        _, first = np.unique(keys, return_index=True)
        once = np.zeros(m, dtype=bool)
        once[first] = True
        keep = np.flatnonzero(fresh & once)[:need]  # draw order kept: the result depends on the seed only
        out.append(cand[keep])
        have += len(keep)
        taken = np.union1d(taken, keys[keep])
        if have == n:
            return np.concatenate(out)
    raise ValueError(f"could not draw {n} unique new codes in {max_rounds} rounds")


def scale_gallery(image_ids: Sequence[str], features: np.ndarray, codes: np.ndarray, size: int, *,
                  first: int = 0, noise_std: float = 0.1, seed: int = 0, chunk: int = 65536) -> ScaledGallery:
    """A gallery of `size` images from real ones (rows of `features`/`codes`; see the module docstring).

    The first `first` real rows (the query split's images) come first, the rest in a seeded order."""
    features = np.asarray(features)
    codes = np.asarray(codes, dtype=np.int64)
    n_real = len(image_ids)
    if features.shape[0] != n_real or codes.shape[0] != n_real:
        raise ValueError(f"{n_real} image ids, {features.shape[0]} feature rows, {codes.shape[0]} code rows")
    if size < 1:
        raise ValueError(f"gallery size must be >= 1, got {size}")
    rng = np.random.default_rng([seed, 1])
    order = np.concatenate([np.arange(first), first + rng.permutation(n_real - first)])
    take = order[:min(size, n_real)]
    feats = np.empty((size, features.shape[1]), dtype=np.float32)
    feats[:len(take)] = features[take]
    norms = np.linalg.norm(feats[:len(take)], axis=1, keepdims=True)
    feats[:len(take)] /= np.maximum(norms, 1e-12)
    ids = [str(image_ids[i]) for i in take]
    out_codes = codes[take]
    n_new = size - len(take)
    if n_new > 0:
        rng_f = np.random.default_rng([seed, 2])
        dim = features.shape[1]
        src = rng_f.integers(0, n_real, size=n_new)
        for lo in range(0, n_new, chunk):
            s = src[lo:lo + chunk]
            x = np.asarray(features[s], dtype=np.float32)
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            x = x + rng_f.standard_normal(x.shape, dtype=np.float32) * np.float32(noise_std / math.sqrt(dim))
            feats[n_real + lo:n_real + lo + len(s)] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        new_codes = sample_new_codes(codes, n_new, np.random.default_rng([seed, 3]))
        out_codes = np.concatenate([out_codes, new_codes])
        ids += [f"synthetic_{j}" for j in range(n_new)]
    return ScaledGallery(image_ids=ids, features=feats, codes=out_codes, num_real=len(take))


SCALE_SIZES = (10_000_000, 100_000_000, 1_000_000_000)


def scale_rows(rows: Sequence[dict], dim: int, sizes: Sequence[int] = SCALE_SIZES) -> list[dict]:
    """Extrapolated memory per system at ``sizes`` images: bytes per image measured on the largest
    gallery (the index as built, at its default knob) times the size -- linear extrapolation, labelled
    as such -- and, for exact search, the multiply-adds per query (d per image)."""
    largest = {}
    for r in rows:
        if r.get("mode") == "batch" and r.get("default_knob", True):
            if r["system"] not in largest or r["gallery_size"] > largest[r["system"]]["gallery_size"]:
                largest[r["system"]] = r
    out = []
    for system, r in sorted(largest.items()):
        per_image = r["structure_mb"] * 2**20 / max(int(r["gallery_size"]), 1)
        row = {"system": system, "measured_at": int(r["gallery_size"]), "bytes_per_image": round(per_image, 2),
               "queries_per_s_measured": round(float(r["queries_per_s"]), 2)}
        for n in sizes:
            row[f"GB_at_{n:.0e}".replace("+0", "")] = round(per_image * n / 2**30, 2)
        row["exact_macs_per_query_at_1e9"] = int(dim) * sizes[-1] if system.startswith("clip_") and dim else ""
        row["extrapolated"] = True
        out.append(row)
    return out


__all__ = ["SCALE_SIZES", "ScaledGallery", "sample_new_codes", "scale_gallery", "scale_rows"]
