"""Seeding so that CPU runs repeat exactly."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Sequence

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (deterministic kernels:
    :func:`deterministic_algorithms`)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """Deterministic kernels inside the block (a warning where an op has none), the previous global
    setting restored after it. On the CPU some kernels (e.g. the scatter-add behind an indexed
    tensor's gradient) split their float sums over threads in an order that varies from run to run;
    their deterministic versions make a seeded run repeat bit for bit."""
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def seeded_generator(*keys: int) -> torch.Generator:
    """A torch generator that depends only on ``keys`` (e.g. seed, epoch, micro-batch): what it draws
    is the same in a resumed run and touches no global RNG."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0]))


def seeded_subset(items: Sequence, n: int, seed: int, salt: int) -> list:
    """A seeded random subset of N items in their original order (all when n <= 0 or n >= len): every
    --max-* option of the trainers and stages draws its subset here (``salt`` keeps their draws apart)."""
    if n <= 0 or n >= len(items):
        return list(items)
    pick = np.sort(np.random.default_rng([seed, salt]).choice(len(items), n, replace=False))
    return [items[i] for i in pick]


__all__ = ["deterministic_algorithms", "seeded_generator", "seeded_subset", "set_seed"]
