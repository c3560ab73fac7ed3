"""Approximate nearest-neighbour (ANN) indexes over the CLIP image features: the baselines a user who
outgrows exact search would pick, for the efficiency benchmark (avg.experiments.efficiency).

Three FAISS indexes (``pip install faiss-cpu``, the ``ann`` extra; ``faiss-gpu`` works the same where
a GPU is at hand), all by inner product on the L2-normalised features, trained on the gallery itself:

* ``ivf_flat`` -- k-means into ``nlist`` lists, exact vectors; knob ``nprobe`` (lists visited).
* ``ivf_pq``   -- the same lists, each vector product-quantised to ``pq_bytes`` bytes; knob ``nprobe``.
* ``hnsw``     -- a navigable small-world graph with ``M`` links per node, exact vectors; knob ``efSearch``.

With ``nprobe = nlist`` an IVF-Flat index scans every list: exact search (the tests check it).
Defaults follow FAISS's guidelines: ``nlist ~ 4 sqrt(n)`` (at most n / 39, the k-means minimum of
points per centroid), PQ with 8-bit codes (fewer bits for galleries under 256 x 39 vectors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from avg.core.io import InputError

KINDS = ("ivf_flat", "ivf_pq", "hnsw")
# the knob each kind sweeps, and its default sweep (clipped to what an index allows)
KNOB = {"ivf_flat": "nprobe", "ivf_pq": "nprobe", "hnsw": "efSearch"}
DEFAULT_SWEEP = {"ivf_flat": (1, 2, 4, 8, 16, 32, 64), "ivf_pq": (1, 2, 4, 8, 16, 32, 64), "hnsw": (16, 32, 64, 128, 256)}


def require_faiss():
    try:
        import faiss
    except ImportError:
        raise InputError("the ANN baselines need FAISS: pip install faiss-cpu (or the 'ann' extra: pip install -e '.[ann]')") from None
    return faiss


def default_nlist(n: int) -> int:
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


@dataclass
class AnnIndex:
    kind: str
    index: object          # the faiss index
    nlist: Optional[int]
    params: dict           # what it was built with (nlist, pq_bytes, pq_bits, M)

    @property
    def knob(self) -> str:
        return KNOB[self.kind]

    def knob_values(self, sweep: Optional[Sequence[int]] = None) -> list[int]:
        """The sweep, clipped to the index (an IVF index visits at most nlist lists)."""
        values = list(sweep or DEFAULT_SWEEP[self.kind])
        if self.nlist:
            values = sorted({min(int(v), self.nlist) for v in values})
        return values

    def set_knob(self, value: int) -> None:
        faiss = require_faiss()
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = int(value)
        else:
            faiss.extract_index_ivf(self.index).nprobe = int(value)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) [n, k] for float32 queries [n, d]; rows -1 where fewer than k were found."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(q, int(min(k, self.index.ntotal)))

    @property
    def nbytes(self) -> int:
        """Serialized size of the index (vectors or codes, lists or graph, ids)."""
        return int(require_faiss().serialize_index(self.index).nbytes)


def build_ann(features: np.ndarray, kind: str, *, nlist: Optional[int] = None, pq_bytes: Optional[int] = None,
              hnsw_m: int = 32, ef_construction: int = 64, seed: int = 0, max_train: int = 256 * 256) -> AnnIndex:
    """An ANN index of ``kind`` over float32 rows ``features`` [n, d] (L2-normalised: inner product = cosine)."""
    faiss = require_faiss()
    if kind not in KINDS:
        raise InputError(f"unknown ANN index {kind!r}: expected one of {', '.join(KINDS)}")
    x = np.ascontiguousarray(features, dtype=np.float32)
    n, d = x.shape
    if n < 1:
        raise InputError("an ANN index needs at least one vector")
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
        index.add(x)
        return AnnIndex(kind, index, None, {"M": int(hnsw_m), "efConstruction": int(ef_construction)})
    nlist = int(nlist or default_nlist(n))
    quantizer = faiss.IndexFlatIP(d)
    params = {"nlist": nlist}
    if kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        m = int(pq_bytes or max(1, d // 8))
        while d % m:  # PQ splits the d components evenly among m sub-quantizers
            m -= 1
        bits = 8 if n >= 256 * 39 else max(1, min(8, int(math.log2(max(n // 39, 2)))))
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
        params.update({"pq_bytes": math.ceil(m * bits / 8), "pq_m": m, "pq_bits": bits})
    rng = np.random.default_rng([seed, 23])
    max_train = max(int(max_train), 39 * nlist)  # k-means wants at least 39 points per list
    train = x if n <= max_train else x[np.sort(rng.choice(n, max_train, replace=False))]
    index.cp.seed = int(seed)  # the k-means of the lists
    index.train(train)
    index.add(x)
    return AnnIndex(kind, index, nlist, params)


def exact_topk(features: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k largest inner products per query (the naive reference)."""
    s = np.asarray(queries, dtype=np.float32) @ np.asarray(features, dtype=np.float32).T
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (throughput, recall) points: True where no other point is at least as good on both and
    better on one."""
    flags = []
    for i, (t, r) in enumerate(points):
        dominated = any((t2 >= t and r2 >= r) and (t2 > t or r2 > r) for j, (t2, r2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


__all__ = ["KINDS", "KNOB", "DEFAULT_SWEEP", "AnnIndex", "build_ann", "default_nlist", "exact_topk", "pareto_front",
           "require_faiss"]
