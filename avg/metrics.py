"""The one metrics function: text-to-image Recall@K and mean rank over images, per query.

Every system (CLIP baseline, generative retriever, reranker) is scored from its run records by
``retrieval_metrics``, so all numbers follow the same protocol: a query is a hit at K when one of
its gold image ids is among the first K *distinct image ids* of its ranked list. A ranked list
that is shorter than the gallery (beam search returns at most ``beam`` images) counts the
missing positions as misses; the rank of a gold image that was not returned is taken to be
``gallery_size`` for mean rank when the gallery size is known (a pessimistic, documented choice),
and such queries are also counted in ``not_found``.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

DEFAULT_KS = (1, 5, 10, 20)


def recall_ks(depth: int) -> tuple:
    """R@K cut-offs for a ranked list of ``depth`` items: DEFAULT_KS, 50 and 100 where the list is
    that deep, and ``depth`` itself -- R@depth is the list's recall, the ceiling of any reranker."""
    ks = [k for k in (*DEFAULT_KS, 50, 100) if k <= depth]
    return tuple(sorted({*ks, int(depth)})) if depth >= 1 else DEFAULT_KS


def gold_set(gold) -> set:
    """A run record's gold image(s) as a set."""
    if isinstance(gold, (list, tuple, set, frozenset)):
        return set(gold)
    return {gold}


def first_hit_rank(ranked: Sequence, gold) -> Optional[int]:
    """1-based rank of the first gold image among distinct ids of `ranked`, or None."""
    gold = gold_set(gold)
    seen = set()
    rank = 0
    for image_id in ranked:
        if image_id in seen:  # an image listed twice occupies one rank only
            continue
        seen.add(image_id)
        rank += 1
        if image_id in gold:
            return rank
    return None


def retrieval_metrics(
    records: Iterable[Union[Mapping, object]],
    ks: Sequence[int] = DEFAULT_KS,
    gallery_size: Optional[int] = None,
) -> dict:
    """R@K in percent, mean/median rank, and counts, from run records (dicts or RunRecord)."""
    ranks = []
    for rec in records:
        ranked = rec["ranked"] if isinstance(rec, Mapping) else rec.ranked
        gold = rec["gold"] if isinstance(rec, Mapping) else rec.gold
        ranks.append(first_hit_rank(ranked, gold))
    n = len(ranks)
    if n == 0:
        raise ValueError("retrieval_metrics: no queries")
    out = {}
    for k in ks:
        out[f"R@{k}"] = 100.0 * sum(r is not None and r <= k for r in ranks) / n
    found = [r for r in ranks if r is not None]
    missing = n - len(found)
    fill = gallery_size if gallery_size is not None else None
    if fill is not None:
        all_ranks = np.array([r if r is not None else fill for r in ranks], dtype=np.float64)
        out["mean_rank"] = float(all_ranks.mean())
        out["median_rank"] = float(np.median(all_ranks))
    else:
        out["mean_rank"] = float(np.mean(found)) if found else float("nan")
        out["median_rank"] = float(np.median(found)) if found else float("nan")
    out["num_queries"] = n
    out["not_found"] = missing
    if gallery_size is not None:
        out["gallery_size"] = int(gallery_size)
    return out


def format_metrics(metrics: Mapping, ks: Sequence[int] = DEFAULT_KS) -> str:
    parts = [f"R@{k}={metrics[f'R@{k}']:.2f}" for k in ks if f"R@{k}" in metrics]
    if "mean_rank" in metrics:
        parts.append(f"mean_rank={metrics['mean_rank']:.2f}")
    parts.append(f"queries={metrics.get('num_queries')}")
    return " ".join(parts)
