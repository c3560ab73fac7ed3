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
  patch tokens pooled to a g x g grid (``emb/image_grid.npy``). S learned slots summarise the
  query's token states once; per candidate they cross-attend the grid cells (with a learned
  position per cell) and an MLP scores what they found. The pooled CLIP feature keeps little of
  where things are (linear probes of the demo's features, tools/probe_demo_features.py), the grid
  keeps it; the cost per candidate is S x g^2 attention, still independent of the gallery.

Fusion: ``s = head + u * cos(t, v) + w * (s_ret - max s_ret in the list)``. ``u`` (the embedding
score's weight, ``embed_fusion``: none, fixed or learned from ``embed_weight``) starts the reranker
at the CLIP order of the list; ``w`` is fixed, learned (``--fusion learned``, from
``--fusion-weight``: at w = 1 the list's softmax is the retriever's own distribution) or chosen on
val after training (``--fusion val``: the training lists need no retriever scores).

Saved folder (``save_reranker``): tokenizer (with the image tokens), ``reranker.json`` (base
model, template, LoRA or full, head and fusion settings, the image-token map), ``head.safetensors``
(MLP head + fusion weight), ``image_tokens.json`` (every image's token indices, so the folder is
self-contained) and either a peft adapter (LoRA + trainable image-token rows) or a full model.
"""
from __future__ import annotations

import os
import shutil
import types
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from avg.reranker.image_tokens import ImageTokenMap, ImageTokens, image_token
from avg.retriever import llama as L
from avg.retriever.vocab import project_codebook
from avg.utils.io import InputError, read_json, replace_dir, write_json

META_FILE = "reranker.json"
HEAD_FILE = "head.safetensors"
DEFAULT_PROMPT_TEMPLATE = "Caption: {query}\nImage:"
FUSION_MODES = ("none", "fixed", "learned", "val")
EMBED_FUSION_MODES = ("none", "fixed", "learned")
QUERY_POOLING = ("last", "mean")


# ---------------------------------------------------------------------------- image tokens in the LM
def image_token_capacity(tokenizer) -> int:
    """How many consecutive ``<img_00000>``, ``<img_00001>``, ... the tokenizer already holds."""
    vocab = tokenizer.get_vocab()
    n = 0
    while image_token(n) in vocab:
        n += 1
    return n


def ensure_image_tokens(tokenizer, lm, mapping: ImageTokenMap, vectors: Optional[np.ndarray] = None, *,
                        seed: int = 0, model_name: str = "model", reuse_rows: bool = False) -> tuple[torch.Tensor, bool]:
    """Token ids of image tokens 0..mapping.num_tokens-1 -> (ids, added).

    A model that has ``<img_*>`` tokens (SEED-LLaMA) keeps the tokens (the map must fit them: bounds
    check), but its rows of the used tokens are re-initialised like added ones: SEED's ``<img_k>``
    means SEED's visual code k, which has nothing to do with voken k, so its pretrained row would
    tell the LM something false. ``reuse_rows`` keeps SEED's rows anyway (meaning-free; an explicit
    choice). Any other model gets the tokens added. New rows start from ``vectors`` (random-projected
    to the model width and rescaled to the mean norm of the existing rows, as for the retriever's
    vokens) or, where a row has no vector, seeded noise."""
    capacity = image_token_capacity(tokenizer)
    names = [image_token(i) for i in range(mapping.num_tokens)]
    added = False
    if capacity:
        mapping.check_fits(capacity, model=model_name)
        ids = torch.tensor(tokenizer.convert_tokens_to_ids(names), dtype=torch.long)
        if reuse_rows:
            return ids, False
        n_real = min(lm.get_input_embeddings().weight.shape[0], len(tokenizer))
    else:
        old_rows = lm.get_input_embeddings().weight.shape[0]
        n_real = min(old_rows, len(tokenizer))
        tokenizer.add_tokens(names, special_tokens=True)
        ids = torch.tensor(tokenizer.convert_tokens_to_ids(names), dtype=torch.long)
        if len(tokenizer) > old_rows:
            lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        added = True
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for weight in {id(w): w for w in (lm.get_input_embeddings().weight,
                                          getattr(lm.get_output_embeddings(), "weight", None)) if w is not None}.values():
            target = float(weight[:n_real].float().norm(dim=1).mean())
            rows = torch.randn(len(names), weight.shape[1], generator=gen)
            rows = rows * (target / rows.norm(dim=1).mean())
            if vectors is not None:
                have = ~np.isnan(np.asarray(vectors)[: len(names), 0])
                if have.any():
                    mapped = project_codebook(torch.from_numpy(np.asarray(vectors)[: len(names)][have]).float(),
                                              weight.shape[1], gen)
                    rows[torch.from_numpy(have)] = mapped * (target / mapped.norm(dim=1).mean().clamp_min(1e-12))
            weight.data[ids.to(weight.device)] = rows.to(weight.device, weight.dtype)
    lm.config.vocab_size = lm.get_input_embeddings().weight.shape[0]
    return ids, added


IMAGE_WRAP = ("<img>", "</img>")


def image_wrap_ids(tokenizer) -> tuple[list[int], list[int]]:
    """SEED-LLaMA marks an image as ``<img> <img_a> ... </img>``: the ids of that wrapper when the
    tokenizer has both tokens, else nothing."""
    vocab = tokenizer.get_vocab()
    if all(t in vocab for t in IMAGE_WRAP):
        return [int(vocab[IMAGE_WRAP[0]])], [int(vocab[IMAGE_WRAP[1]])]
    return [], []


def add_lora(lm, token_ids: torch.Tensor, **lora_kwargs):
    """LoRA on the attention (avg.retriever.llama.lora_config) + trainable image-token rows."""
    from peft import get_peft_model

    # the reranker reads hidden states and never runs the LM's output head: image-token rows train
    # in the input embedding only (rows in an untied head would get no gradient: DDP stops on them)
    cfg = L.lora_config(lm, types.SimpleNamespace(voken_ids=token_ids), output_rows=False, **lora_kwargs)
    try:
        return get_peft_model(lm, cfg)
    except ValueError as e:
        raise InputError(f"--lora-target-modules {cfg.target_modules}: {e}") from None


# ---------------------------------------------------------------------------- the module
def freeze_unused_head(lm) -> bool:
    """Full fine-tuning: an untied output head is never run by the reranker; freeze it so that no
    trainable parameter goes without a gradient (DDP's reducer requires every one to get one).
    Returns whether a head was frozen (a tied head is the input embedding and stays trainable)."""
    if L.embeddings_tied(lm):
        return False
    lm.get_output_embeddings().weight.requires_grad_(False)
    return True


class ScoreHead(nn.Module):
    def __init__(self, hidden_size: int, *, inner: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)


class GridHead(nn.Module):
    """Query slots x image grid cells (module docstring): [P, S, d] slots and [P, cells, W] grids ->
    [P] scores. The last layer starts at zero, so an untrained grid head adds nothing."""

    def __init__(self, hidden_size: int, grid_width: int, cells: int, *, slots: int = 8, width: int = 256):
        super().__init__()
        heads = 4 if width % 4 == 0 else 1
        self.text = nn.Linear(hidden_size, width)
        self.slots = nn.Parameter(torch.randn(1, slots, width) * 0.02)
        self.summarise_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.image = nn.Sequential(nn.LayerNorm(grid_width), nn.Linear(grid_width, width))
        self.position = nn.Parameter(torch.randn(cells, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attend = nn.MultiheadAttention(width, heads, batch_first=True)
        self.score = nn.Sequential(nn.Linear(3 * width, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.zeros_(self.score[-1].weight)
        nn.init.zeros_(self.score[-1].bias)

    def shape(self) -> dict:
        """The sizes that rebuild it (saved in reranker.json)."""
        return {"grid_slots": int(self.slots.shape[1]), "grid_cells": int(self.position.shape[0]),
                "grid_width": int(self.image[0].normalized_shape[0])}

    def summarise(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, T, H] query token states, [B, T] attention mask -> [B, S, width] slots (once per query)."""
        keys = self.text(states.to(self.text.weight.dtype))
        slots = self.slots.expand(states.shape[0], -1, -1)
        out, _ = self.summarise_attn(slots, keys, keys, key_padding_mask=~mask.bool(), need_weights=False)
        return out

    def forward(self, slots: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if grid.shape[1] != self.position.shape[0]:
            raise ValueError(f"the grid head was built for {self.position.shape[0]} cells, the features have {grid.shape[1]}")
        cells = self.image(grid.to(self.position.dtype)) + self.position
        found, _ = self.attend(self.norm(slots), cells, cells, need_weights=False)
        return self.score(torch.cat([slots, found, slots * found], dim=-1)).squeeze(-1).mean(1).float()


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
        w = torch.tensor(float(fusion_weight if fusion not in ("none", "val") else 0.0))
        if fusion == "learned":
            self.fusion_weight = nn.Parameter(w)
        else:
            self.register_buffer("fusion_weight", w)
        u = torch.tensor(float(embed_weight if embed_fusion != "none" else 0.0))
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
        body(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, past_key_values=cache,
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
        out = body(**inputs, attention_mask=mask, position_ids=cand_pos, past_key_values=cache, use_cache=True)
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


# ---------------------------------------------------------------------------- save / load
def save_reranker(reranker: Reranker, tokenizer, tokens: ImageTokens, out: str | os.PathLike, *, base_model: str,
                  prompt_template: str, max_length: int, image_tokens_added: bool, info: Optional[dict] = None,
                  extra_meta: Optional[dict] = None) -> Path:
    """Write a reranker folder (module docstring), swapped into place atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm = reranker.lm
    lora = L.is_peft(lm)
    try:
        if lora:
            lm.save_pretrained(tmp, save_embedding_layers=False)
        else:
            L.deterministic_generation_config(lm, tokenizer)
            lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = {}
        for name in ("head", "image_proj", "grid_head"):
            module = getattr(reranker, name)
            if module is not None:
                state.update({f"{name}.{k}": v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()})
        state["fusion_weight"] = reranker.fusion_weight.detach().float().cpu().reshape(1)
        state["embed_weight"] = reranker.embed_weight.detach().float().cpu().reshape(1)
        save_file(state, str(tmp / HEAD_FILE))
        tokens.save(tmp)
        rows = int(L.search_model(lm).get_input_embeddings().weight.shape[0])
        write_json({"base_model": str(base_model), "prompt_template": prompt_template, "lora": lora,
                    "max_length": int(max_length), "embedding_rows": rows, "tokenizer_size": len(tokenizer),
                    "image_tokens_added": bool(image_tokens_added), "image_token_map": tokens.mapping.to_dict(),
                    **reranker.head_config(), **(extra_meta or {})}, tmp / META_FILE)
        if info is not None:
            write_json(info, tmp / "best.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, out)


def load_reranker(path: str | os.PathLike, *, base_model: Optional[str] = None, dtype: torch.dtype = torch.float32,
                  device=None, merge: bool = True):
    """Saved folder -> (tokenizer, reranker (eval mode), image tokens, meta)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta = read_json(path / META_FILE)
    for key in ("base_model", "prompt_template", "lora", "fusion"):
        if key not in meta:
            raise InputError(f"{path / META_FILE}: missing key {key!r}")
    tokenizer = L.prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    tokens = ImageTokens.load(path)
    if meta["lora"]:
        from peft import PeftModel

        name = base_model or meta["base_model"]
        try:
            lm = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except OSError as e:
            raise InputError(f"{path / META_FILE}: cannot load base model {name!r} ({e}); pass --base-model") from None
        rows = int(meta.get("embedding_rows") or len(tokenizer))
        if rows != lm.get_input_embeddings().weight.shape[0]:
            lm.resize_token_embeddings(rows, mean_resizing=False)
        lm.config.vocab_size = rows
        lm = PeftModel.from_pretrained(lm, str(path), is_trainable=False)
        if merge:
            lm = lm.merge_and_unload()
    else:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    reranker = Reranker(lm, head_inner=int(meta["head_inner"]), head_dropout=float(meta["head_dropout"]),
                        fusion=meta["fusion"], fusion_weight=float(meta["fusion_weight"]),
                        feature_dim=int(meta.get("feature_dim", 0)), image_prefix=int(meta.get("image_prefix", 0)),
                        feature_head=bool(meta.get("feature_head", False)),
                        candidate_tokens=bool(meta.get("candidate_tokens", True)),
                        embed_fusion=meta.get("embed_fusion", "none"), embed_weight=float(meta.get("embed_weight", 0.0)),
                        query_pooling=meta.get("query_pooling", "last"), grid_slots=int(meta.get("grid_slots", 0)),
                        grid_width=int(meta.get("grid_width", 0)), grid_cells=int(meta.get("grid_cells", 0)))
    state = load_file(str(path / HEAD_FILE))
    try:
        for name in ("head", "image_proj", "grid_head"):
            module = getattr(reranker, name)
            if module is not None:
                module.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
    except RuntimeError as e:
        raise InputError(f"{path / HEAD_FILE}: does not match {path / META_FILE} ({e})") from None
    with torch.no_grad():
        reranker.fusion_weight.copy_(state["fusion_weight"].reshape(()))
        if "embed_weight" in state:
            reranker.embed_weight.copy_(state["embed_weight"].reshape(()))
    for module in (reranker.head, reranker.image_proj, reranker.grid_head):
        if module is not None:
            module.to(dtype=torch.float32)
    if device is not None:
        reranker = reranker.to(device)
    reranker.eval()
    return tokenizer, reranker, tokens, meta


def image_token_ids(tokens: ImageTokens, token_ids: torch.Tensor) -> dict:
    """image id -> LM token ids of its image-token sequence."""
    table = token_ids.tolist()
    return {i: [table[v] for v in seq] for i, seq in tokens.images.items()}


# ---------------------------------------------------------------------------- batched scoring
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

    from avg.utils.progress import tqdm

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


__all__ = ["META_FILE", "HEAD_FILE", "DEFAULT_PROMPT_TEMPLATE", "FUSION_MODES", "image_token_capacity",
           "ensure_image_tokens", "add_lora", "ScoreHead", "GridHead", "last_token_index", "Reranker", "save_reranker",
           "load_reranker", "image_token_ids", "score_lists", "reranked_records", "relative_retriever_scores",
           "fuse_parts", "choose_fusion_weight", "FUSION_GRID", "EMBED_FUSION_MODES"]
