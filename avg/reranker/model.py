"""The reranker: a causal LM (SEED-LLaMA or any LLaMA-family model) + an MLP scoring head.

Input of a (query, candidate) pair: ``prompt(query) <img_a> <img_b> ... EOS`` (avg.reranker.data).
The LM's last hidden layer at the last non-pad token (it has attended to the whole query and
every image token) goes through a small MLP to one score. Positions come from the attention
mask, so left- and right-padded batches give the same scores (tested). The LM's output head is
never computed: the transformer body is called directly, which also keeps LoRA layers active.

What the reranker sees of a candidate image (besides the query's words):

* its image tokens (vokens, optionally richer residual tokens), wrapped in ``<img>`` ... ``</img>``
  when the tokenizer has those (SEED-LLaMA);
* ``image_prefix`` P soft tokens: the candidate's CLIP image feature through a learned linear map,
  in front of its image tokens (a cross-encoder that reads the image's real features);
* ``feature_head``: the head reads ``[h, v, t * v, t]`` -- the LM state ``h`` next to the
  candidate's and the query's CLIP features and their product;
* ``candidate_tokens=False`` (late interaction): the LM reads the query prompt once and the head
  scores every candidate from the query state and the candidate's features (needs
  ``feature_head``): k times cheaper than a cross-encoder, for CPU budgets;
* ``grid_slots`` S (late interaction, :class:`GridHead`): the candidate's *layout* -- the CLIP ViT's
  patch tokens pooled to a g x g grid (``prepare_emb/image_grid.npy``). S learned slots summarise the
  query's token states once; per candidate they cross-attend the grid cells (with a learned
  position per cell) and an MLP scores what they found. The pooled CLIP feature keeps little of
  where things are (linear probes of the demo's features, tools/probe_demo_features.py), the grid
  keeps it; the cost per candidate is S x g^2 attention, still independent of the gallery.

Fusion: ``s = head + u * cos(t, v) + w * (s_ret - max s_ret in the list)``. ``u`` (the embedding
score's weight, ``embed_fusion``: none, fixed or learned from ``embed_weight``) starts the reranker
at the CLIP order of the list; ``w`` is fixed, learned (``--fusion learned``, from
``--fusion-weight``: at w = 1 the list's softmax is the retriever's own distribution) or chosen on
val after training (``--fusion val``: the training lists need no retriever scores).

Around it: avg.reranker.lm_setup (image tokens, LoRA), avg.reranker.heads (the MLP and grid heads),
avg.reranker.saving (the saved folder), avg.reranker.scoring (whole lists, fusion chosen on val).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from avg.reranker.heads import GridHead, ScoreHead
from avg.retriever import llama as L

DEFAULT_PROMPT_TEMPLATE = "Caption: {query}\nImage:"
FUSION_MODES = ("none", "fixed", "learned", "val")
EMBED_FUSION_MODES = ("none", "fixed", "learned")
QUERY_POOLING = ("last", "mean")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad position of each row (left or right padding)."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(1).long().argmax(1)


class Reranker(nn.Module):
    def __init__(self, lm, *, head_inner: int = 256, head_dropout: float = 0.1, fusion: str = "learned",
                 fusion_weight: float = 1.0, feature_dim: int = 0, image_prefix: int = 0, feature_head: bool = False,
                 candidate_tokens: bool = True, embed_fusion: str = "none", embed_weight: float = 10.0,
                 query_pooling: str = "last", grid_slots: int = 0, grid_width: int = 0, grid_cells: int = 0):
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}")
        if embed_fusion not in EMBED_FUSION_MODES:
            raise ValueError(f"embed_fusion must be one of {EMBED_FUSION_MODES}")
        if (image_prefix or feature_head or embed_fusion != "none") and feature_dim < 1:
            raise ValueError("image_prefix, feature_head and embed_fusion need the CLIP feature_dim")
        if not candidate_tokens and not (feature_head or grid_slots):
            raise ValueError("candidate_tokens=False (late interaction) needs feature_head or grid_slots: the head must see the candidate")
        if grid_slots and (candidate_tokens or grid_width < 1 or grid_cells < 1):
            raise ValueError("grid_slots needs late interaction (candidate_tokens=False) and the grid's width and cells")
        self.lm = lm
        cfg = L.search_model(lm).config
        hidden = int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)
        self.feature_dim, self.image_prefix = int(feature_dim), int(image_prefix)
        self.feature_head, self.candidate_tokens = bool(feature_head), bool(candidate_tokens)
        if query_pooling not in QUERY_POOLING:
            raise ValueError(f"query_pooling must be one of {QUERY_POOLING}")
        self.query_pooling = query_pooling
        self.image_proj = nn.Linear(self.feature_dim, self.image_prefix * hidden) if self.image_prefix else None
        self.head = ScoreHead(hidden + (3 * self.feature_dim if self.feature_head else 0), inner=head_inner,
                              dropout=head_dropout)
        self.grid_head = GridHead(hidden, grid_width, grid_cells, slots=grid_slots, width=head_inner) if grid_slots else None
        if embed_fusion != "none":  # start exactly at the CLIP order of the list: the head adds 0 until trained
            nn.init.zeros_(self.head.net[-1].weight)
            nn.init.zeros_(self.head.net[-1].bias)
        self.fusion, self.embed_fusion = fusion, embed_fusion
        # the two weights are one-element vectors, not 0-d tensors: DeepSpeed's ZeRO flattens every parameter and
        # cannot view a 0-d one
        w = torch.tensor([float(fusion_weight if fusion not in ("none", "val") else 0.0)])
        if fusion == "learned":
            self.fusion_weight = nn.Parameter(w)
        else:
            self.register_buffer("fusion_weight", w)
        u = torch.tensor([float(embed_weight if embed_fusion != "none" else 0.0)])
        if embed_fusion == "learned":
            self.embed_weight = nn.Parameter(u)
        else:
            self.register_buffer("embed_weight", u)

    def body(self):
        """The transformer body of the causal LM (no output head); LoRA layers live inside it."""
        causal = L.search_model(self.lm)
        return getattr(causal, causal.base_model_prefix)

    def _soft(self, pair_features: torch.Tensor, dtype) -> torch.Tensor:
        """[P, D] candidate image features -> [P, image_prefix, H] soft tokens."""
        out = self.image_proj(pair_features.to(self.image_proj.weight.dtype))
        return out.view(pair_features.shape[0], self.image_prefix, -1).to(dtype)

    def _head(self, h: torch.Tensor, pair_t: Optional[torch.Tensor], pair_v: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = self.head.net[0].weight.dtype
        h = h.to(dtype)
        if self.feature_head:
            t, v = pair_t.to(dtype), pair_v.to(dtype)
            h = torch.cat([h, v, t * v, t], dim=-1)
        return self.head(h).float()

    def score_pairs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, soft_start: Optional[torch.Tensor] = None,
                    pair_t: Optional[torch.Tensor] = None, pair_v: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Head score of every (query, candidate) sequence [P] (float32)."""
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        body = self.body()
        if self.image_prefix:
            embeds = body.get_input_embeddings()(input_ids).clone()
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
            cols = soft_start.to(input_ids.device)[:, None] + torch.arange(self.image_prefix, device=input_ids.device)[None]
            embeds[rows, cols] = self._soft(pair_v, embeds.dtype)
            out = body(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        else:
            out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        h = out.last_hidden_state
        last = h[torch.arange(h.shape[0], device=h.device), last_token_index(attention_mask)]
        return self._head(last, pair_t, pair_v)

    def score_shared_prefix(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, candidate_ids: torch.Tensor,
                            list_index: torch.Tensor, pair_t: Optional[torch.Tensor] = None,
                            pair_v: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Same scores as score_pairs, computing each query's prompt once: the prompt batch [B, T]
        runs with a KV cache, the cache is gathered to the pairs (``list_index`` [P]) and only the
        candidates' tokens [P, L] (all of one length) run per pair -- k times fewer prompt tokens.
        Right-padded prompts leave pads between prompt and candidate, masked out: this needs an
        attention that takes any 2-D mask (eager / sdpa, the transformers default; not
        flash-attention-2, which assumes one-sided padding -- pass --no-shared-prefix there)."""
        from transformers import DynamicCache

        body = self.body()
        positions = (prompt_mask.long().cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=body.config)
        body(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, cache=cache,
             use_cache=True)
        cache.batch_select_indices(list_index)
        n_cand = candidate_ids.shape[1]
        lengths = prompt_mask.long().sum(1)[list_index]
        mask = torch.cat([prompt_mask[list_index], prompt_mask.new_ones(candidate_ids.shape)], dim=1)
        cand_pos = lengths[:, None] + torch.arange(n_cand, device=candidate_ids.device)[None, :]
        if self.image_prefix:
            embeds = body.get_input_embeddings()(candidate_ids).clone()
            embeds[:, : self.image_prefix] = self._soft(pair_v, embeds.dtype)
            inputs = {"inputs_embeds": embeds}
        else:
            inputs = {"input_ids": candidate_ids}
        out = body(**inputs, attention_mask=mask, position_ids=cand_pos, cache=cache, use_cache=True)
        return self._head(out.last_hidden_state[:, -1], pair_t, pair_v)

    def score_query_only(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, list_index: torch.Tensor,
                         pair_t: torch.Tensor, pair_v: torch.Tensor, pair_grid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Late interaction: the LM reads each prompt once; every pair is scored by the head from the
        prompt's state (its last token's, or the mean over its tokens: ``query_pooling``) and the
        pair's features, plus the grid head's score of the pair's image grid when there is one."""
        positions = (prompt_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.body()(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=False)
        h = out.last_hidden_state
        if self.query_pooling == "mean":
            m = prompt_mask.to(h.dtype)[..., None]
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:
            pooled = h[torch.arange(h.shape[0], device=h.device), last_token_index(prompt_mask)]
        score = self._head(pooled[list_index], pair_t, pair_v)
        if self.grid_head is not None:
            if pair_grid is None:
                raise ValueError("this reranker reads image grids: pass candidate_grid")
            score = score + self.grid_head(self.grid_head.summarise(h, prompt_mask)[list_index], pair_grid)
        return score

    def can_share_prefix(self) -> bool:
        """Gradient checkpointing drops the KV cache in training: use the flat path then."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        return not (self.training and any(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
                                          for m in self.body().modules()))

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                valid: Optional[torch.Tensor] = None, retriever_scores: Optional[torch.Tensor] = None,
                known: Optional[torch.Tensor] = None, prompt_ids: Optional[torch.Tensor] = None,
                prompt_mask: Optional[torch.Tensor] = None, candidate_ids: Optional[torch.Tensor] = None,
                list_index: Optional[torch.Tensor] = None, share_prefix: bool = True,
                soft_start: Optional[torch.Tensor] = None, query_features: Optional[torch.Tensor] = None,
                candidate_features: Optional[torch.Tensor] = None, cosine: Optional[torch.Tensor] = None,
                candidate_grid: Optional[torch.Tensor] = None):
        """Pair scores [P]; with ``valid`` [B, K] (the fields of avg.reranker.data.ListCollator),
        (base, fused) scores per list [B, K] (-inf past a list's end): ``base`` = head + u * cos,
        ``fused`` = base + w * retriever score. Uses the shared-prefix path when the prompt fields are
        given and allowed. Fusion runs inside forward so that DDP sees the learned weights used."""
        pair_t = pair_v = None
        if self.feature_dim:
            if query_features is None or candidate_features is None or valid is None:
                raise ValueError("this reranker reads CLIP features: pass query_features, candidate_features and valid")
            pair_t = query_features[list_index]
            pair_v = candidate_features[valid.to(candidate_features.device)]
        pair_grid = candidate_grid[valid.to(candidate_grid.device)] if candidate_grid is not None else None
        if not self.candidate_tokens:
            pair = self.score_query_only(prompt_ids, prompt_mask, list_index, pair_t, pair_v, pair_grid)
        elif share_prefix and prompt_ids is not None and candidate_ids is not None and self.can_share_prefix():
            pair = self.score_shared_prefix(prompt_ids, prompt_mask, candidate_ids, list_index, pair_t, pair_v)
        else:
            pair = self.score_pairs(input_ids, attention_mask, soft_start, pair_t, pair_v)
        if valid is None:
            return pair
        from avg.reranker.data import unflatten

        base = unflatten(pair, {"valid": valid})
        if self.embed_fusion != "none":
            base = base + self.embed_weight.float() * cosine.to(base.device).float()
        if retriever_scores is None:
            return base, base
        return base, base + self.fusion_weight.float() * relative_retriever_scores(retriever_scores, known).to(base.device)

    def head_config(self) -> dict:
        lin = self.head.net[0]
        return {"head_inner": lin.out_features, "head_dropout": float(self.head.net[2].p), "fusion": self.fusion,
                "fusion_weight": float(self.fusion_weight.detach()), "feature_dim": self.feature_dim,
                "image_prefix": self.image_prefix, "feature_head": self.feature_head,
                "candidate_tokens": self.candidate_tokens, "query_pooling": self.query_pooling,
                "embed_fusion": self.embed_fusion,
                "embed_weight": float(self.embed_weight.detach()),
                **(self.grid_head.shape() if self.grid_head is not None else
                   {"grid_slots": 0, "grid_cells": 0, "grid_width": 0})}


def relative_retriever_scores(retriever_scores: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """``s_ret - max known s_ret of the list`` [B, K]; 0 where the score is unknown."""
    r = retriever_scores.float()
    top = torch.where(known, r, torch.full_like(r, float("-inf"))).amax(1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return torch.where(known, r - top, torch.zeros_like(r))


__all__ = ["DEFAULT_PROMPT_TEMPLATE", "FUSION_MODES", "EMBED_FUSION_MODES", "QUERY_POOLING", "last_token_index",
           "Reranker", "relative_retriever_scores"]
