"""Embedding rerank: a retriever's top-k re-scored with the CLIP features it was built on.

For a query with CLIP text feature ``t`` and a candidate image with feature ``v`` (both from
``prepare_emb/``, L2-normalised), the fused score is::

    s = cos(t, v) + w * (s_ret - max_j s_ret)

(``s_ret``: the retriever's own score of the candidate; a candidate without one adds nothing).
``w = 0`` orders the list by CLIP similarity alone, ``w = inf`` keeps the retriever's order. The
weight is chosen on val (:func:`choose_weight`), never on test. The cost per query is k dot
products of the feature width -- independent of the gallery's size, as GENIUS's "embedding
reranking" (CVPR'25). The reranked list holds the top-k only, so R@K for K <= k is exact and R@k
of the input list is its ceiling.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from avg.metrics import recall_ks, retrieval_metrics
from avg.core.io import InputError

DEFAULT_WEIGHTS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, math.inf)


def embed_rerank_system(retriever: str) -> str:
    """The system name of the embedding rerank of a retriever (its stage folder's name, RERANK_RETRIEVER)."""
    return f"{retriever}+embed_rerank"


def l2_normalize(x) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class FeatureStore:
    """CLIP features of ``prepare_emb/`` by image id and by (image id, caption): what rerankers look up."""

    def __init__(self, emb):
        self.emb = emb
        self.image_row = {str(im["image_id"]): r for r, im in enumerate(emb.images)}
        self.caption_row = emb.caption_row_map()

    @classmethod
    def load(cls, emb_dir) -> "FeatureStore":
        from avg.artifacts.emb import load_emb

        return cls(load_emb(emb_dir))

    @property
    def dim(self) -> int:
        return int(self.emb.image_features.shape[1])

    def grid_shape(self, source: str = "prepare_emb/") -> tuple[int, int]:
        """(cells, width) of the image grids; an error naming the folder when prepare_emb/ has none."""
        if self.emb.image_grid is None:
            raise InputError(f"{source}: no image_grid.npy: run prepare_emb with --image-grid G (EMB_IMAGE_GRID) "
                             "for a reranker with --grid-head")
        return int(self.emb.image_grid.shape[1]), int(self.emb.image_grid.shape[2])

    def image_rows(self, image_ids: Sequence[str], source: str = "candidates") -> np.ndarray:
        try:
            return np.array([self.image_row[str(i)] for i in image_ids], dtype=np.int64)
        except KeyError as e:
            raise InputError(f"{source}: image {e.args[0]!r} has no feature in prepare_emb/ (made from another dataset?)") from None

    def images(self, image_ids: Sequence[str], source: str = "candidates") -> np.ndarray:
        """float32 [n, D], L2-normalised."""
        return l2_normalize(self.emb.image_features[self.image_rows(image_ids, source)])

    def text_row(self, gold, query: str, source: str = "queries") -> int:
        gold_id = gold[0] if isinstance(gold, (list, tuple)) else gold
        row = self.caption_row.get((str(gold_id), query))
        if row is None:
            raise InputError(f"{source}: query {query!r} (gold {gold_id!r}) is not a caption in prepare_emb/: an embedding "
                             "rerank needs the query's CLIP text feature")
        return row

    def texts(self, records: Sequence[dict], source: str = "queries") -> np.ndarray:
        """float32 [n, D] normalised text features of run records ({query, gold})."""
        rows = [self.text_row(r["gold"], r["query"], f"{source}: record {n}") for n, r in enumerate(records, 1)]
        return l2_normalize(self.emb.text_features[np.asarray(rows, dtype=np.int64)])


def fused_scores(cos: np.ndarray, retriever_scores: Sequence[Optional[float]], weight: float) -> np.ndarray:
    """``cos + w * (s_ret - max s_ret)`` for one list; ``w = inf``: the retriever's order (ties by cos)."""
    r = np.array([np.nan if s is None else float(s) for s in retriever_scores], dtype=np.float64)
    known = np.isfinite(r)
    rel = np.where(known, r - (r[known].max() if known.any() else 0.0), 0.0)
    if math.isinf(weight):
        return rel * 1e6 + cos  # retriever order; cos only breaks its ties
    return cos + weight * rel


def rerank_list(candidates: Sequence[str], retriever_scores: Sequence[Optional[float]], cos: np.ndarray,
                weight: float) -> tuple[list, list]:
    """One list re-ordered by :func:`fused_scores` (stable: ties keep the retriever's order) ->
    (ids, fused scores): the one place the embedding rerank orders candidates (the stage, the search
    API and the efficiency benchmark all call it)."""
    fused = fused_scores(np.asarray(cos, dtype=np.float64), retriever_scores, weight)
    order = np.argsort(-fused, kind="stable")
    return [candidates[j] for j in order], [float(fused[j]) for j in order]


def candidate_cosines(records: Sequence[dict], store: FeatureStore, k: int, text: Optional[np.ndarray] = None,
                      source: str = "run file") -> list[tuple[list, list, np.ndarray]]:
    """Per record its top-k ids, their retriever scores and their CLIP cosines with the query: what
    every fusion weight re-orders (computed once, however many weights are tried)."""
    text = store.texts(records, source) if text is None else text
    out = []
    for n, (rec, t) in enumerate(zip(records, text)):
        cands = list(rec["ranked"])[:k]
        scores = list(rec.get("scores") or [None] * len(cands))[:k]
        cos = store.images(cands, f"{source}: record {n + 1}") @ t if cands else np.zeros(0, dtype=np.float32)
        out.append((cands, scores, cos))
    return out


def rerank_records(records: Sequence[dict], store: FeatureStore, weight: float, k: int,
                   text: Optional[np.ndarray] = None, source: str = "run file",
                   cosines: Optional[list] = None) -> list[dict]:
    """Each record's top-k re-ordered by the fused score (:func:`rerank_list`); ``cosines`` from
    :func:`candidate_cosines` when already computed."""
    cosines = candidate_cosines(records, store, k, text, source) if cosines is None else cosines
    out = []
    for rec, (cands, scores, cos) in zip(records, cosines):
        ranked, fused = rerank_list(cands, scores, cos, weight) if cands else ([], [])
        out.append({"qid": rec["qid"], "query": rec["query"], "gold": rec["gold"], "ranked": ranked, "scores": fused})
    return out


def choose_weight(records: Sequence[dict], store: FeatureStore, k: int, weights: Sequence[float] = DEFAULT_WEIGHTS,
                  gallery_size: Optional[int] = None) -> tuple[float, list[dict]]:
    """The weight with the best R@1 on ``records`` (val), ties by R@5 then R@10 then the smaller
    weight; returns (weight, one row of metrics per weight)."""
    cosines = candidate_cosines(records, store, k, source="val run")
    rows = []
    for w in weights:
        m = retrieval_metrics(rerank_records(records, store, w, k, cosines=cosines), ks=recall_ks(k),
                              gallery_size=gallery_size)
        rows.append({"weight": w, **{key: m[key] for key in ("R@1", "R@5", "R@10") if key in m}})
    best = max(rows, key=lambda r: (r["R@1"], r.get("R@5", 0.0), r.get("R@10", 0.0), -r["weight"]))
    return best["weight"], rows


EMBED_FIT_BOUNDS = (1e-2, 1e4)


def fit_embed_weight(cosines: Sequence[np.ndarray], labels: Sequence[int], *, temperature: float = 1.0,
                     lo: float = EMBED_FIT_BOUNDS[0], hi: float = EMBED_FIT_BOUNDS[1], iters: int = 60) -> float:
    """The weight u of the cosine that minimises the mean listwise loss ``-log softmax(u * cos / T)[positive]``
    of the cosine alone over these lists (one array of cosines per list, the positive's index in each;
    a list without a positive, index -1, is left out as the listwise loss leaves it out).

    The loss is convex in u (a log-sum-exp of terms linear in u), so its derivative
    ``(E_softmax[cos] - cos_positive) / T`` grows with u: bisection on it, in log space, within [lo, hi]
    (a bound when the optimum lies outside). The reranker starts from this u, the best scale of the
    CLIP score on its own training lists, so its learned parts add to a calibrated cosine."""
    if len(cosines) != len(labels):
        raise ValueError(f"need one positive index per list, got {len(cosines)} lists and {len(labels)} labels")
    kept = [(c, y) for c, y in zip(cosines, labels) if y >= 0]
    if not kept:
        raise ValueError("no list holds its positive: nothing to fit the cosine's weight on")
    cosines, labels = [c for c, _ in kept], [y for _, y in kept]
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    width = max(len(c) for c in cosines)
    cos = np.full((len(cosines), width), -np.inf)
    for i, c in enumerate(cosines):
        cos[i, : len(c)] = np.asarray(c, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if (labels >= np.array([len(c) for c in cosines])).any():
        raise ValueError("a positive index lies outside its list")
    valid = np.isfinite(cos)
    pos = cos[np.arange(len(labels)), labels]
    filled = np.where(valid, cos, 0.0)

    def slope(u: float) -> float:
        z = np.where(valid, u * filled / temperature, -np.inf)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return float(((p * filled).sum(axis=1) - pos).mean() / temperature)

    if slope(lo) >= 0:
        return float(lo)
    if slope(hi) <= 0:
        return float(hi)
    a, b = math.log(lo), math.log(hi)
    for _ in range(iters):
        m = 0.5 * (a + b)
        a, b = (m, b) if slope(math.exp(m)) < 0 else (a, m)
    return float(math.exp(0.5 * (a + b)))


__all__ = ["embed_rerank_system", "l2_normalize", "DEFAULT_WEIGHTS", "FeatureStore", "fused_scores", "rerank_list", "candidate_cosines",
           "rerank_records", "choose_weight", "fit_embed_weight", "EMBED_FIT_BOUNDS"]
