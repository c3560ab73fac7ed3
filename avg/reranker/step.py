"""A saved LM reranker as one step of the pipeline, for lists made at query time.

:class:`LmRerankStep` loads a saved reranker once and builds its lists' datasets. The test stage
(``avg.stages.test_reranker_llama``) uses it on the lists of a run file, whose queries are captions with features
in ``prepare_emb/``; the search API and the efficiency benchmark (:meth:`LmRerankStep.rerank`) on typed
queries, whose CLIP text features come from the text tower at query time, with the retriever's
top-k of that moment. Either way each list is reordered by the reranker's score fused with the
retriever's at the reranker's own fusion weight (learned, fixed, or chosen on val); the API test in
tests/test_e2e_scripts.py checks that both give the same ids and scores. Its cost per query is k
sequences of the LM -- independent of the gallery's size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from avg.reranker import lm_setup
from avg.reranker import saving
from avg.reranker import scoring
from avg.reranker.data import ListDataset
from avg.reranker.embed import FeatureStore
from avg.retriever import llama as L
from avg.core.io import InputError, read_json


def reranker_feature_store(rmeta: dict, emb_dir: Optional[str], meta_file: Path) -> Optional[FeatureStore]:
    """The CLIP features a reranker reads (None when it reads none), checked against what it was trained on."""
    if not int(rmeta.get("feature_dim", 0)):
        return None
    emb_dir = emb_dir or rmeta.get("emb_dir")
    if not emb_dir:
        raise InputError(f"{meta_file}: the reranker reads CLIP features; pass --emb-dir")
    store = FeatureStore.load(emb_dir)
    if int(rmeta.get("grid_slots", 0)):
        cells, width = store.grid_shape(emb_dir)
        if (cells, width) != (int(rmeta["grid_cells"]), int(rmeta["grid_width"])):
            raise InputError(f"{emb_dir}: image grids of {cells} cells x {width}, but the reranker "
                             f"{meta_file} was trained on {rmeta['grid_cells']} x {rmeta['grid_width']}")
    return store


class LmRerankStep:
    """(queries, their CLIP text features, the retriever's top-k ids and scores) -> reranked lists."""

    def __init__(self, reranker, tokenizer, tokens, meta: dict, store: Optional[FeatureStore], device, *,
                 batch_size: int = 16, autocast=None):
        self.reranker, self.tokenizer, self.meta, self.store = reranker.eval(), tokenizer, meta, store
        self.device, self.batch_size, self.autocast = torch.device(device), int(batch_size), autocast
        ids = torch.tensor(tokenizer.convert_tokens_to_ids([f"<img_{i:05d}>" for i in range(tokens.mapping.num_tokens)]))
        self.token_ids = saving.image_token_ids(tokens, ids)
        self.format = L.prompt_formatter(meta["prompt_template"])
        self.needs_features = store is not None
        self.path: Optional[Path] = None  # the saved folder, when loaded from one

    @staticmethod
    def check(reranker_dir, emb_dir: Optional[str] = None) -> Optional[FeatureStore]:
        """A saved reranker's folder and the CLIP features it reads (None when none), checked and loaded
        without loading the model: what a stage does before it writes anything."""
        meta_file = Path(reranker_dir) / saving.META_FILE
        if not meta_file.is_file():
            raise InputError(f"{meta_file}: not found (run scripts/finetune_reranker_llama.sh first)")
        return reranker_feature_store(read_json(meta_file), emb_dir, meta_file)

    @classmethod
    def load(cls, reranker_dir, *, device, emb_dir: Optional[str] = None, base_model: Optional[str] = None,
             dtype: Optional[torch.dtype] = None, batch_size: int = 16, store=None) -> "LmRerankStep":
        """``dtype`` None: bf16 weights on a bf16-capable GPU, float32 elsewhere (the LoRA rule of
        avg.retriever.llama.resolve_dtype). ``store``: the features :meth:`check` returned, if the
        caller checked already (else checked and loaded here)."""
        if store is None:
            store = cls.check(reranker_dir, emb_dir)
        dev = torch.device(device)
        if dtype is None:
            dtype = L.resolve_dtype("auto", lora=True, device=dev)
        tokenizer, reranker, tokens, meta = saving.load_reranker(reranker_dir, base_model=base_model, dtype=dtype,
                                                                 device=device)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) \
            if dev.type == "cuda" and dtype == torch.bfloat16 else None
        step = cls(reranker, tokenizer, tokens, meta, store, dev, batch_size=batch_size, autocast=autocast)
        step.path = Path(reranker_dir)
        return step

    def covers(self, image_ids: Sequence[str]) -> bool:
        """Whether every image has the reranker's inputs (image tokens; CLIP features when it reads them)."""
        if any(i not in self.token_ids for i in image_ids):
            return False
        return self.store is None or all(i in self.store.image_row for i in image_ids)

    def dataset(self, lists: Sequence[dict], source: str, query_features=None) -> ListDataset:
        """The reranker's inputs for these lists (the prompt format, image tokens, prefix, grids it was
        trained with); ``query_features`` one row per list for queries that are not captions of prepare_emb/."""
        return ListDataset(lists, self.tokenizer, self.token_ids, self.format,
                           max_length=int(self.meta.get("max_length", 64)), source=source,
                           image_prefix=int(self.meta.get("image_prefix", 0)), features=self.store,
                           wrap=lm_setup.image_wrap_ids(self.tokenizer), image_grid=bool(self.meta.get("grid_slots", 0)),
                           query_features=query_features)

    @torch.no_grad()
    def rerank(self, queries: Sequence[str], candidates: Sequence[Sequence[str]],
               scores: Sequence[Sequence[Optional[float]]], query_features=None) -> list[tuple[list[str], list[float]]]:
        """Each (ids, scores) list reordered by the fused reranker score, best first; ties keep the
        retriever's order. ``query_features`` [Q, d] (the queries' CLIP text features) is needed
        when the reranker reads CLIP features."""
        if not (len(queries) == len(candidates) == len(scores)):
            raise ValueError(f"{len(queries)} queries, {len(candidates)} candidate lists, {len(scores)} score lists")
        for n, (c, s) in enumerate(zip(candidates, scores), 1):
            if len(c) != len(s):
                raise ValueError(f"query {n}: {len(c)} candidates but {len(s)} retriever scores")
        if query_features is not None and len(query_features) != len(queries):
            raise ValueError(f"{len(query_features)} query features for {len(queries)} queries")
        keep = [n for n, c in enumerate(candidates) if len(c)]
        out: list = [([], []) for _ in queries]
        if not keep:
            return out
        lists = [{"qid": n, "query": queries[n], "gold": None, "candidates": list(candidates[n]),
                  "scores": [None if s is None else float(s) for s in scores[n]], "inserted": False} for n in keep]
        feats = None
        if self.needs_features:
            if query_features is None:
                raise ValueError("this reranker reads CLIP features: pass the queries' query_features")
            feats = np.asarray(query_features.detach().float().cpu() if torch.is_tensor(query_features)
                               else query_features, dtype=np.float32)[keep]
        ds = self.dataset(lists, "query-time lists", query_features=feats)
        fused = scoring.score_lists(self.reranker, ds, self.batch_size, self.device, desc="rerank", autocast=self.autocast,
                                    show_progress=False)
        for rec in scoring.reranked_records(ds.lists, fused):
            out[rec["qid"]] = (rec["ranked"], rec["scores"])
        return out


__all__ = ["LmRerankStep", "reranker_feature_store"]
