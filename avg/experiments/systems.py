"""The systems the efficiency benchmark times (avg.experiments.efficiency): each answers ``search(texts)``
with ranked image ids, query text in, the text encoding included.

* :class:`GenerativeSystem` -- AVG: constrained beam search over the gallery's codes, optionally
  followed by the embedding rerank and the trained LM reranker (the whole pipeline);
* :class:`TwoTowerSystem` -- the CLIP two-tower: exact inner-product search in fp32 or fp16;
* :class:`AnnSystem` -- the same features in an approximate FAISS index (avg.experiments.ann).
"""
from __future__ import annotations

import gc
import time
from typing import Optional, Sequence

import numpy as np
import torch

PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def retriever_dtype(name: str, device: torch.device) -> torch.dtype:
    """--retriever-dtype: 'auto' is bf16 on a GPU that supports it (T5 overflows in fp16), else fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GenerativeSystem:
    """Text -> constrained beam search over the gallery's codes -> ranked image ids.

    A retriever that reads the query's CLIP text feature (avg.retriever.prefix) gets it from
    ``text_encoder`` inside the timed call. With ``rerank_k`` the top-k are re-scored by the CLIP
    cosine of query and candidate (the embedding rerank, weight ``rerank_weight`` on the retriever's
    score) -- the whole AVG pipeline as it answers a query, one text encoding shared by both. With
    ``lm_step`` as well (avg.reranker.step.LmRerankStep) the top-k go to the trained LM reranker
    instead; it runs on galleries whose images all have its inputs (:meth:`supports`)."""

    def __init__(self, retriever, device, *, num_beams: int = 20, score_eos: bool = True, fast_search: bool = False,
                 text_encoder=None, rerank_k: int = 0, rerank_weight: float = 0.0, lm_step=None,
                 dtype: torch.dtype = torch.float32) -> None:
        from avg.retriever.evaluate import logits_vocab_size

        if dtype not in PRECISION_NAMES:
            raise ValueError(f"retriever dtype {dtype}: one of {sorted(map(str, PRECISION_NAMES))}")
        self.precision = PRECISION_NAMES[dtype]  # the query prefix stays fp32; its output is cast to the model's
        self.model, self.tokenizer, self.vocab = retriever.model.to(device, dtype).eval(), retriever.tokenizer, retriever.vocab
        self.prefix = retriever.prefix.to(device) if retriever.prefix is not None else None
        self.device, self.num_beams, self.max_length = device, num_beams, retriever.max_length
        self.normalize = retriever.normalize
        self.eos = self.tokenizer.eos_token_id if score_eos and self.normalize != "children" else None
        self.voken_ids = self.vocab.voken_ids.to(device) if fast_search or self.normalize == "children" else None
        self.vsize = logits_vocab_size(self.model)
        self.is_enc_dec = bool(getattr(self.model.config, "is_encoder_decoder", False))
        self.tokenizer.padding_side = "right" if self.is_enc_dec else "left"
        if (self.prefix is not None or rerank_k) and text_encoder is None:
            raise ValueError("this generative system needs the CLIP text encoder (query prefix or embedding rerank)")
        if lm_step is not None and not rerank_k:
            raise ValueError("the LM reranking step needs the depth it reranks (rerank_k)")
        self.text_encoder, self.rerank_k, self.rerank_weight = text_encoder, int(rerank_k), float(rerank_weight)
        self.lm_step = lm_step
        self.name = "avg+lm_rerank" if lm_step is not None else "avg+embed_rerank" if self.rerank_k else "avg"
        self.gallery = self.index = self.features = self.row_of = None
        # the curve's knob: the beam for AVG alone, the reranked depth for the pipeline (beam fixed)
        self.knob = "rerank_k" if self.rerank_k else "beam"
        self.default_knob = self.rerank_k if self.rerank_k else self.num_beams

    def knob_values(self, sweep: Optional[Sequence[int]] = None) -> list[int]:
        top = self.num_beams if self.rerank_k else max(self.num_beams, *(sweep or [0]))
        values = sorted({int(v) for v in (sweep or (10, 20, 50)) if 1 <= int(v) <= top} | {self.default_knob})
        return values

    def set_knob(self, value: int) -> None:
        if self.rerank_k:
            self.rerank_k = int(value)
        else:
            self.num_beams = int(value)

    def supports(self, image_ids: Sequence[str]) -> bool:
        """Whether this system can answer over the gallery (the LM reranker needs every image's inputs)."""
        return self.lm_step is None or self.lm_step.covers(image_ids)

    def set_gallery(self, image_ids: Sequence[str], codes: np.ndarray, features=None) -> float:
        from avg.search.gallery import Gallery

        t0 = time.perf_counter()
        self.gallery = Gallery(image_ids, codes, name="benchmark gallery")
        self.index = self.gallery.build_index(self.vocab, self.vsize, device=self.device)
        if self.rerank_k and self.lm_step is None:  # the candidates' features are looked up, never searched
            self.features = torch.from_numpy(np.ascontiguousarray(features)).to(self.device, torch.float32)
            self.row_of = {i: r for r, i in enumerate(image_ids)}
        sync(self.device)
        return time.perf_counter() - t0

    @property
    def structure_bytes(self) -> int:
        """The code index (the features the embedding rerank reads are the two-tower's, not counted again)."""
        return int(self.index.nbytes)

    @torch.no_grad()
    def search(self, texts: Sequence[str]) -> list:
        from avg.retriever.prefix import prefixed_inputs
        from avg.search.beam import constrained_beam_search

        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        needs_q = self.prefix is not None or (self.rerank_k and (self.lm_step is None or self.lm_step.needs_features))
        q = self.text_encoder.encode_texts(list(texts)).to(self.device, torch.float32) \
            if self.text_encoder is not None and needs_q else None
        start = self.model.config.decoder_start_token_id if self.is_enc_dec else None
        inputs = prefixed_inputs(self.model, self.prefix, enc["input_ids"].to(self.device),
                                 enc["attention_mask"].to(self.device), q if self.prefix is not None else None)
        out = constrained_beam_search(self.model, inputs.get("input_ids"), inputs["attention_mask"], self.index,
                                      self.num_beams, decoder_start_token_id=start, eos_token_id=self.eos,
                                      voken_ids=self.voken_ids, inputs_embeds=inputs.get("inputs_embeds"),
                                      normalize=self.normalize)
        codes = self.vocab.token_ids_to_codes(out.sequences.cpu()).numpy()
        scores = out.scores.float().cpu().numpy()
        valid = out.num_valid.cpu().tolist()
        ranked = [self.gallery.rank(codes[r, :k], scores[r, :k]) for r, k in enumerate(valid)]
        if not self.rerank_k:
            return [ids for ids, _ in ranked]
        if self.lm_step is not None:
            k = self.rerank_k
            lists = self.lm_step.rerank(list(texts), [ids[:k] for ids, _ in ranked], [s[:k] for _, s in ranked], q)
            return [ids for ids, _ in lists]
        from avg.reranker.embed import rerank_list

        out_ids = []
        for r, (ids, s) in enumerate(ranked):
            ids = ids[: self.rerank_k]
            cos = (self.features[[self.row_of[i] for i in ids]] @ q[r]).cpu().numpy()
            out_ids.append(rerank_list(ids, s[: self.rerank_k], cos, self.rerank_weight)[0])
        return out_ids


class TwoTowerSystem:
    """Text -> CLIP text tower -> exact inner-product search over the features -> ranked image ids."""

    def __init__(self, encoder, device, *, k: int = 20, precision: str = "fp32") -> None:
        self.encoder, self.device, self.k, self.precision = encoder, device, k, precision
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
        self.name = f"clip_{precision}"
        self.features = self.image_ids = None
        self.knob, self.default_knob = None, None

    def knob_values(self, sweep=None) -> list:
        return [None]

    def set_knob(self, value) -> None:
        pass

    def set_gallery(self, image_ids: Sequence[str], codes, features: np.ndarray) -> float:
        self.features = None
        gc.collect()
        t0 = time.perf_counter()
        self.image_ids = list(image_ids)
        self.features = torch.from_numpy(np.ascontiguousarray(features)).to(self.device, self.dtype)
        sync(self.device)
        return time.perf_counter() - t0

    @property
    def structure_bytes(self) -> int:
        return int(self.features.numel() * self.features.element_size())

    @torch.no_grad()
    def search(self, texts: Sequence[str]) -> list:
        q = self.encoder.encode_texts(list(texts)).to(self.device, self.dtype)
        _, idx = torch.topk(q @ self.features.T, min(self.k, self.features.shape[0]), dim=1)
        ids = self.image_ids
        return [[ids[j] for j in row] for row in idx.cpu().tolist()]


class AnnSystem:
    """Text -> CLIP text tower -> an approximate index (avg.experiments.ann: IVF-Flat, IVF-PQ, HNSW) over the
    same features -> ranked image ids. Built (trained) on each gallery; ``build_s`` includes training."""

    precision = "fp32"

    def __init__(self, encoder, device, kind: str, *, k: int = 20, sweep: Optional[Sequence[int]] = None,
                 nlist: Optional[int] = None, pq_bytes: Optional[int] = None, hnsw_m: int = 32, seed: int = 0) -> None:
        from avg.experiments.ann import KNOB, require_faiss

        require_faiss()
        self.encoder, self.device, self.kind, self.k, self.sweep = encoder, device, kind, k, sweep
        self.build_kwargs = {"nlist": nlist, "pq_bytes": pq_bytes, "hnsw_m": hnsw_m, "seed": seed}
        self.name, self.knob = kind, KNOB[kind]
        self.ann = self.image_ids = None
        self.default_knob = None

    def set_gallery(self, image_ids: Sequence[str], codes, features: np.ndarray) -> float:
        from avg.experiments.ann import build_ann

        self.ann = None
        gc.collect()
        t0 = time.perf_counter()
        self.image_ids = list(image_ids)
        self.ann = build_ann(np.asarray(features, dtype=np.float32), self.kind, **self.build_kwargs)
        values = self.ann.knob_values(self.sweep)
        self.default_knob = values[len(values) // 2]  # the middle of the sweep for the batch-1 point
        self.set_knob(self.default_knob)
        build_s = time.perf_counter() - t0
        self._nbytes = self.ann.nbytes  # serialises the index: once per gallery, not once per timed point
        return build_s

    def knob_values(self, sweep=None) -> list[int]:
        return self.ann.knob_values(sweep or self.sweep)

    def set_knob(self, value: int) -> None:
        self.ann.set_knob(value)

    @property
    def structure_bytes(self) -> int:
        return self._nbytes

    @torch.no_grad()
    def search(self, texts: Sequence[str]) -> list:
        q = self.encoder.encode_texts(list(texts)).float().cpu().numpy()
        _, rows = self.ann.search(q, self.k)
        ids = self.image_ids
        return [[ids[j] for j in row if j >= 0] for row in rows.tolist()]


__all__ = ["PRECISION_NAMES", "AnnSystem", "GenerativeSystem", "TwoTowerSystem", "retriever_dtype", "sync"]
