"""Reranker data: each query's top-k retriever candidates, and batches of (query, candidate) inputs.

A candidate list (one jsonl line of ``prepare_reranker_dataset/{split}.jsonl``)::

    {"qid", "query", "gold", "candidates": [image ids, retriever order], "scores": [retriever
     scores; null for an inserted positive], "gold_rank": 1-based rank in the retriever's list or
     null, "inserted": bool}

Training lists always hold the positive: when the retriever missed it, it replaces the last
(weakest) candidate and is marked ``inserted`` (its retriever score is unknown: null). Evaluation
lists are the retriever's top-k exactly as returned, so reranked metrics are honest: a query whose
gold is not in the list stays a miss.

The LM input for a (query, candidate) pair is ``prompt(query) + [P placeholders] + image tokens +
EOS``; the P placeholders (``image_prefix``) are where the model puts the candidate's projected CLIP
image feature; the scoring head reads the hidden state of the last non-pad token
(avg.reranker.model). With a feature store (avg.reranker.embed.FeatureStore) every batch also
carries the query's CLIP text feature, each candidate's CLIP image feature and their cosine.

Training lists can come from CLIP instead of the retriever (:func:`clip_lists`): each training
query's top-k by the cosine of the CLIP features among a chunk of training images as large as the
evaluation gallery -- hard negatives at the cost of k x chunk dot products, no search. Their
retriever scores are unknown (null).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from avg.reranker.embed import l2_normalize
from avg.core.io import InputError, read_jsonl


# ---------------------------------------------------------------------------- candidate lists
def candidate_list(record, k: int, *, insert_positive: bool) -> dict:
    """One run record ({qid, query, gold, ranked, scores}) -> a candidate list of at most k images."""
    get = (lambda key: record[key]) if isinstance(record, dict) else (lambda key: getattr(record, key))
    gold = get("gold")
    if isinstance(gold, (list, tuple)):
        gold = gold[0] if len(gold) == 1 else list(gold)
    ranked = [str(i) for i in get("ranked")]
    scores = [float(s) for s in get("scores")] if get("scores") else [None] * len(ranked)
    seen, cands, cscores = set(), [], []
    for i, s in zip(ranked, scores):  # distinct images, retriever order
        if i not in seen:
            seen.add(i)
            cands.append(i)
            cscores.append(s)
        if len(cands) == k:
            break
    golds = set(gold) if isinstance(gold, list) else {gold}
    gold_rank = next((r + 1 for r, i in enumerate(cands) if i in golds), None)
    inserted = False
    if gold_rank is None and insert_positive and k > 0:
        g = gold[0] if isinstance(gold, list) else gold
        if len(cands) == k:
            cands, cscores = cands[:-1], cscores[:-1]
        cands.append(g)
        cscores.append(None)
        inserted = True
    return {"qid": get("qid"), "query": get("query"), "gold": gold, "candidates": cands, "scores": cscores,
            "gold_rank": gold_rank, "inserted": inserted}


def candidate_lists(records, k: int, *, insert_positive: bool) -> list[dict]:
    if k < 1:
        raise InputError(f"--topk must be >= 1, got {k}")
    return [candidate_list(r, k, insert_positive=insert_positive) for r in records]


def shorten_list(lst: dict, k: int) -> dict:
    """A training list cut to its first k candidates, still holding the positive: when the cut drops
    it, it takes the last kept place and the list is marked ``inserted`` (as candidate_list does)."""
    if k < 1:
        raise InputError(f"a list must keep at least one candidate, got k = {k}")
    if len(lst["candidates"]) <= k:
        return lst
    cands, scores = list(lst["candidates"][:k]), list(lst["scores"][:k])
    pos = positive_index(lst)
    inserted = bool(lst.get("inserted"))
    if pos >= k:
        cands[-1], scores[-1], inserted = lst["candidates"][pos], None, True
    return {**lst, "candidates": cands, "scores": scores, "inserted": inserted}


def list_stats(lists: Sequence[dict]) -> dict:
    n = len(lists)
    found = sum(x["gold_rank"] is not None for x in lists)
    return {"queries": n, "gold_in_topk": 100.0 * found / max(n, 1), "inserted": sum(x["inserted"] for x in lists),
            "mean_list_len": float(np.mean([len(x["candidates"]) for x in lists])) if n else 0.0}


def load_lists(path: str | Path) -> list[dict]:
    """Read candidate lists; errors name the file and the record."""
    path = Path(path)
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        c, s = row.get("candidates"), row.get("scores")
        if not isinstance(row.get("query"), str) or "gold" not in row or not isinstance(c, list) or not c:
            raise InputError(f"{path}: record {n}: needs query, gold and a non-empty candidates list")
        if not isinstance(s, list) or len(s) != len(c):
            raise InputError(f"{path}: record {n}: {len(c)} candidates but scores of length "
                             f"{len(s) if isinstance(s, list) else s!r}")
    return rows


def positive_index(lst: dict) -> int:
    """Index of the (first) gold image in the list, -1 when absent."""
    golds = set(lst["gold"]) if isinstance(lst["gold"], list) else {lst["gold"]}
    return next((j for j, c in enumerate(lst["candidates"]) if c in golds), -1)


# ---------------------------------------------------------------------------- tokenised batches
def pack(sequences: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token sequences to one width -> (input_ids, attention_mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, s in enumerate(sequences):
        sl = slice(width - len(s), width) if padding_side == "left" else slice(0, len(s))
        ids[r, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[r, sl] = 1
    return ids, mask


def clip_lists(queries: Sequence[dict], galleries, store, k: int) -> list[dict]:
    """Training lists mined with CLIP (module docstring): ``queries`` ({qid, query, image_id}), each
    searched among the gallery (avg.search.gallery.Gallery) holding its image; the positive is
    put in place of the last candidate when missed (``inserted``)."""
    owner = {i: g for g, gal in enumerate(galleries) for i in gal.image_ids}
    feats = [store.images(gal.image_ids, f"gallery {g}") for g, gal in enumerate(galleries)]
    text = store.texts([{"gold": q["image_id"], "query": q["query"]} for q in queries], "training queries")
    out = []
    for q, t in zip(queries, text):
        g = owner[q["image_id"]]
        cos = feats[g] @ t
        top = np.argsort(-cos, kind="stable")[:k]
        ranked = [galleries[g].image_ids[j] for j in top]
        lst = candidate_list({"qid": q["qid"], "query": q["query"], "gold": q["image_id"], "ranked": ranked, "scores": None},
                             k, insert_positive=True)
        out.append(lst)
    return out


def two_tower_records(queries: Sequence[dict], gallery, store, k: int) -> list[dict]:
    """The CLIP two-tower's top ``k`` of each query ({qid, query, image_id}) over ``gallery``'s images, scored by the
    cosine: run records ({qid, query, gold, ranked, scores}) for the control lists -- the same reranker over the
    two-tower's candidates instead of the retriever's (prepare_reranker_dataset ``--control``)."""
    feats = store.images(gallery.image_ids, "gallery")
    text = store.texts([{"gold": q["image_id"], "query": q["query"]} for q in queries], "queries")
    cos = text @ feats.T
    top = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    return [{"qid": q["qid"], "query": q["query"], "gold": q["image_id"],
             "ranked": [gallery.image_ids[j] for j in row], "scores": [float(cos[n, j]) for j in row]}
            for n, (q, row) in enumerate(zip(queries, top))]


class ListDataset(torch.utils.data.Dataset):
    """Candidate lists with prompts tokenised once and every image's token ids looked up once.

    ``image_prefix`` placeholders (pad tokens) come first in each candidate's part; ``features``
    (a FeatureStore) adds the CLIP features to every batch (ListCollator)."""

    def __init__(self, lists: Sequence[dict], tokenizer, image_token_ids: dict, prompt_format, *,
                 max_length: int = 64, source: str = "reranker_data", image_prefix: int = 0, features=None,
                 wrap: tuple = ((), ()), image_grid: bool = False, query_features=None):
        self.lists = list(lists)
        self.image_ids = image_token_ids  # image id -> [token ids]
        self.image_prefix = int(image_prefix)
        self.wrap = (list(wrap[0]), list(wrap[1]))  # e.g. SEED-LLaMA's <img> ... </img>
        for n, lst in enumerate(self.lists, 1):
            for c in lst["candidates"]:
                if c not in image_token_ids:
                    raise InputError(f"{source}: record {n}: candidate image {c!r} has no image tokens "
                                     "(convert_voken_to_seed/ made from other codes?)")
        enc = tokenizer([prompt_format(x["query"]) for x in self.lists], truncation=True, max_length=max_length)
        self.prompts = [list(p) for p in enc["input_ids"]]
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id)
        self.labels = [positive_index(x) for x in self.lists]
        self.features = features
        if image_grid and features is None:
            raise ValueError("image_grid needs the feature store")
        self.image_grid = bool(image_grid)
        self.text_rows = self.image_rows = self.query_features = None
        if query_features is not None:  # queries typed at search time: their features, one row per list
            if features is None:
                raise ValueError("query_features need the feature store (the candidates' image features)")
            if len(query_features) != len(self.lists):
                raise ValueError(f"{len(query_features)} query features for {len(self.lists)} lists")
            self.query_features = l2_normalize(query_features)
        if features is not None:
            if self.query_features is None:
                self.text_rows = np.array([features.text_row(x["gold"], x["query"], f"{source}: record {n}")
                                           for n, x in enumerate(self.lists, 1)], dtype=np.int64)
            self.image_rows = [features.image_rows(x["candidates"], f"{source}: record {n}")
                               for n, x in enumerate(self.lists, 1)]

    def cosines(self) -> list[np.ndarray]:
        """Per list, the CLIP cosine of the query with each candidate (the ``cosine`` of every batch)."""
        if self.features is None:
            raise ValueError("cosines need the feature store")
        emb = self.features.emb
        text = self.query_texts(range(len(self.lists)))
        return [l2_normalize(emb.image_features[rows]) @ t for rows, t in zip(self.image_rows, text)]

    def query_texts(self, idx) -> np.ndarray:
        """The lists' query features, unit norm: given at search time, or the captions' rows of prepare_emb/."""
        if self.query_features is not None:
            return self.query_features[list(idx)]
        return l2_normalize(self.features.emb.text_features[self.text_rows[list(idx)]])

    def candidate_tokens(self, image_id: str) -> list[int]:
        """The candidate's part of the sequence: placeholders, wrapped image tokens, EOS."""
        return [self.pad] * self.image_prefix + self.wrap[0] + self.image_ids[image_id] + self.wrap[1] + [self.eos]

    def __len__(self) -> int:
        return len(self.lists)

    def __getitem__(self, i: int) -> int:
        return i


class ListCollator:
    """Batch of list indices -> every (query, candidate) sequence of those lists, flattened.

    Returns input_ids/attention_mask [sum of list lengths, T], ``list_index`` [P] (which list each
    pair belongs to), the same pairs as right-padded prompts [B, Tp] + candidate tokens [P, L] for
    the shared-prefix path (when every image has the same number of tokens), ``soft_start`` [P]
    (where each flat sequence's placeholders begin), and per list (padded to the longest list,
    ``valid`` marks real entries): ``retriever_scores`` [B, K] (0 where unknown), ``known`` [B, K],
    ``labels`` [B] (positive index, -1 if absent) and ``inserted`` [B]; with features,
    ``query_features`` [B, D], ``candidate_features`` [B, K, D] (L2-normalised, 0 past a list's end)
    and ``cosine`` [B, K]; with image grids, ``candidate_grid`` [B, K, cells, W] (0 past a list's end)."""

    def __init__(self, dataset: ListDataset, padding_side: str = "right"):
        self.ds, self.side = dataset, padding_side

    def __call__(self, idx: Sequence[int]) -> dict:
        ds = self.ds
        seqs, owner, soft_start = [], [], []
        for b, i in enumerate(idx):
            for c in ds.lists[i]["candidates"]:
                seqs.append(ds.prompts[i] + ds.candidate_tokens(c))
                owner.append(b)
                soft_start.append(len(ds.prompts[i]))
        ids, mask = pack(seqs, ds.pad, self.side)
        if self.side == "left":
            soft_start = [ids.shape[1] - len(s) + p for s, p in zip(seqs, soft_start)]
        prompt_ids, prompt_mask = pack([ds.prompts[i] for i in idx], ds.pad, "right")
        cands = [ds.candidate_tokens(c) for i in idx for c in ds.lists[i]["candidates"]]
        same = len({len(c) for c in cands}) == 1
        k = max(len(ds.lists[i]["candidates"]) for i in idx)
        scores = torch.zeros((len(idx), k))
        known = torch.zeros((len(idx), k), dtype=torch.bool)
        valid = torch.zeros((len(idx), k), dtype=torch.bool)
        for b, i in enumerate(idx):
            for j, s in enumerate(ds.lists[i]["scores"]):
                valid[b, j] = True
                if s is not None:
                    scores[b, j], known[b, j] = float(s), True
        extra = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                 "candidate_ids": torch.tensor(cands, dtype=torch.long)} if same else {}
        if ds.features is not None:
            extra.update(self._features(idx, k))
        return {**extra, "input_ids": ids, "attention_mask": mask, "list_index": torch.tensor(owner, dtype=torch.long),
                "soft_start": torch.tensor(soft_start, dtype=torch.long),
                "retriever_scores": scores, "known": known, "valid": valid,
                "labels": torch.tensor([ds.labels[i] for i in idx], dtype=torch.long),
                "inserted": torch.tensor([bool(ds.lists[i]["inserted"]) for i in idx]),
                "index": torch.as_tensor(list(idx), dtype=torch.long)}


    def _features(self, idx, k: int) -> dict:
        ds = self.ds
        store = ds.features
        t = torch.from_numpy(ds.query_texts(idx))
        v = torch.zeros((len(idx), k, t.shape[1]))
        grid = store.emb.image_grid if ds.image_grid else None
        g = torch.zeros((len(idx), k, *grid.shape[1:])) if grid is not None else None
        for b, i in enumerate(idx):
            rows = ds.image_rows[i]
            v[b, : len(rows)] = torch.from_numpy(l2_normalize(store.emb.image_features[rows]))
            if g is not None:
                g[b, : len(rows)] = torch.from_numpy(np.asarray(grid[rows], dtype=np.float32))
        out = {"query_features": t, "candidate_features": v, "cosine": (v * t[:, None, :]).sum(-1)}
        return {**out, "candidate_grid": g} if g is not None else out


def unflatten(pair_scores: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-pair scores [P] -> [B, K] in list order (-inf where ``valid`` is False)."""
    valid = batch["valid"].to(pair_scores.device)
    out = torch.full(valid.shape, float("-inf"), dtype=pair_scores.dtype, device=pair_scores.device)
    out[valid] = pair_scores  # pairs are emitted list by list, candidate by candidate = row-major valid order
    return out


def lists_per_batch(n_lists: int, batch_size: int) -> int:
    return math.ceil(n_lists / batch_size) if n_lists else 0


__all__ = ["clip_lists", "candidate_list", "candidate_lists", "shorten_list", "list_stats", "load_lists", "positive_index", "pack", "ListDataset",
           "ListCollator", "unflatten", "lists_per_batch"]
