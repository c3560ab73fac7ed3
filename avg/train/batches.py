"""Seeded, resumable, process-sharded batches: the retrievers' and the reranker's sampler
(:class:`EpochBatchSampler`) and the sharding rule every sampler uses (:func:`shard_batches`; the
RQ-VAE's FeatureBatchSampler too)."""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch


def shard_batches(batches: list, rank: int, world: int) -> list:
    """Process ``rank``'s share of an epoch's ``batches``: every ``world``-th batch from ``rank``, the
    list first padded by wrapping around so that every process gets the same number (DDP never waits
    on a process that ran out)."""
    per_rank = math.ceil(len(batches) / world) if batches else 0
    batches = batches + batches[: per_rank * world - len(batches)]
    return batches[rank::world]


class EpochBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches from a permutation seeded by (seed, epoch), sharded over processes.

    No global RNG is touched, so an epoch's order is a pure function of (seed, epoch) and a resumed
    run can skip exactly the batches it already saw (`skip_batches`). Every rank gets the same
    number of batches (the global list is padded by wrapping around) so DDP never deadlocks.
    ``groups`` (one int per item): a batch never mixes groups -- items are shuffled within their
    group, cut into batches there, and the batches are shuffled (stage 2: one gallery chunk per batch).
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, groups: Optional[Sequence[int]] = None):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world_size
        self.epoch, self.skip = 0, 0
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"groups has {len(self.groups)} entries for {n} items")

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.groups is None:
            order = order.tolist()
            batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        else:
            order = order[np.argsort(self.groups[order], kind="stable")]
            bounds = np.flatnonzero(np.diff(self.groups[order])) + 1
            batches = [run[i:i + self.batch_size].tolist() for run in np.split(order, bounds)
                       for i in range(0, len(run), self.batch_size)]
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
        return shard_batches(batches, self.rank, self.world)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches()[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self._batches()) - self.skip)

    def batches_per_epoch(self) -> int:
        return len(self._batches())


__all__ = ["EpochBatchSampler", "shard_batches"]
