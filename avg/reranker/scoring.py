"""Scoring whole candidate lists with a reranker, and choosing its fusion with the retriever's score on val."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from avg.reranker.model import Reranker, relative_retriever_scores


MODEL_KEYS = ("input_ids", "attention_mask", "valid", "retriever_scores", "known", "prompt_ids", "prompt_mask",
              "candidate_ids", "list_index", "soft_start", "query_features", "candidate_features", "cosine", "candidate_grid")


def model_inputs(batch: dict, device) -> dict:
    """The collated fields Reranker.forward takes, on `device`."""
    return {k: batch[k].to(device) for k in MODEL_KEYS if k in batch}


@torch.no_grad()
def score_lists(reranker: Reranker, dataset, batch_size: int, device, *, desc: str = "rerank",
                show_progress: bool = True, autocast=None, indices: Optional[Sequence[int]] = None,
                share_prefix: bool = True, parts: bool = False) -> dict:
    """Fused scores of every list of `dataset` (avg.reranker.data.ListDataset): {index: [scores]};
    with ``parts``, {index: (base scores, retriever scores relative to the list's best)} so that
    the fusion weight can be chosen afterwards (:func:`choose_fusion_weight`).

    ``batch_size`` lists per forward pass (every candidate of a list in the same pass)."""
    import contextlib

    from avg.core.progress import tqdm

    from avg.reranker.data import ListCollator

    was = reranker.training
    reranker.eval()
    collate = ListCollator(dataset, padding_side="right")
    order = list(range(len(dataset))) if indices is None else list(indices)
    order.sort(key=lambda i: len(dataset.prompts[i]))  # less padding
    out = {}
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress, leave=False):
        idx = order[s:s + batch_size]
        batch = collate(idx)
        with (autocast() if autocast else contextlib.nullcontext()):
            base, fused = reranker(**model_inputs(batch, device), share_prefix=share_prefix)
        base, fused = base.float().cpu(), fused.float().cpu()
        rel = relative_retriever_scores(batch["retriever_scores"], batch["known"]) if parts else None
        for b, i in enumerate(idx):
            n = len(dataset.lists[i]["candidates"])
            out[i] = (base[b, :n].tolist(), rel[b, :n].tolist()) if parts else fused[b, :n].tolist()
    if was:
        reranker.train()
    return out


def fuse_parts(parts: dict, weight: float) -> dict:
    """{index: (base, relative retriever scores)} -> {index: base + weight * relative}."""
    return {i: [b + weight * r for b, r in zip(base, rel)] for i, (base, rel) in parts.items()}


FUSION_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def choose_fusion_weight(lists: Sequence[dict], parts: dict, *, weights: Sequence[float] = FUSION_GRID,
                         gallery_size: Optional[int] = None) -> tuple[float, list[dict]]:
    """The retriever-score weight with the best R@1 on these (val) lists, ties by R@5, R@10, then
    the smaller weight; returns (weight, one metrics row per weight)."""
    from avg.metrics import retrieval_metrics

    rows = []
    for w in weights:
        m = retrieval_metrics(reranked_records(lists, fuse_parts(parts, w)), gallery_size=gallery_size)
        rows.append({"weight": float(w), "R@1": m["R@1"], "R@5": m["R@5"], "R@10": m["R@10"]})
    best = max(rows, key=lambda r: (r["R@1"], r["R@5"], r["R@10"], -r["weight"]))
    return best["weight"], rows


def reranked_records(lists: Sequence[dict], scores: dict) -> list[dict]:
    """Run records with each list sorted by the reranker's score (ties keep the retriever's order)."""
    recs = []
    for i, lst in enumerate(lists):
        s = scores[i]
        order = sorted(range(len(s)), key=lambda j: (-s[j], j))
        recs.append({"qid": lst["qid"], "query": lst["query"], "gold": lst["gold"],
                     "ranked": [lst["candidates"][j] for j in order], "scores": [float(s[j]) for j in order]})
    return recs


__all__ = ["MODEL_KEYS", "model_inputs", "score_lists", "fuse_parts", "FUSION_GRID", "choose_fusion_weight",
           "reranked_records"]
