"""The reranker: a causal LM (SEED-LLaMA or any LLaMA-family model) + an MLP scoring head.

Input of a (query, candidate) pair: ``prompt(query) <img_a> <img_b> ... EOS`` (avg.reranker.data).
The LM's last hidden layer at the last non-pad token (it has attended to the whole query and
every image token) goes through a small MLP to one score. Positions come from the attention
mask, so left- and right-padded batches give the same scores (tested). The LM's output head is
never computed: the transformer body is called directly, which also keeps LoRA layers active.

Fusion with the retriever (optional): ``s = head + w * (s_ret - max s_ret in the list)``, with w
fixed or learned (``--fusion learned``, initialised at ``--fusion-weight``). Starting at w = 1 the
list's softmax equals the retriever's own distribution over its top-k, so training starts from the
retriever's ranking and the head learns a correction.

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
FUSION_MODES = ("none", "fixed", "learned")


# ---------------------------------------------------------------------------- image tokens in the LM
def image_token_capacity(tokenizer) -> int:
    """How many consecutive ``<img_00000>``, ``<img_00001>``, ... the tokenizer already holds."""
    vocab = tokenizer.get_vocab()
    n = 0
    while image_token(n) in vocab:
        n += 1
    return n


def ensure_image_tokens(tokenizer, lm, mapping: ImageTokenMap, vectors: Optional[np.ndarray] = None, *,
                        seed: int = 0, model_name: str = "model") -> tuple[torch.Tensor, bool]:
    """Token ids of image tokens 0..mapping.num_tokens-1 -> (ids, added).

    A model that has ``<img_*>`` tokens (SEED-LLaMA) keeps them and their embeddings; the map
    must fit them (bounds check). Any other model gets the same tokens added; their rows start
    from ``vectors`` (random-projected to the model width and rescaled to the mean norm of the
    existing rows, as for the retriever's vokens) or, where a row has no vector, seeded noise."""
    capacity = image_token_capacity(tokenizer)
    names = [image_token(i) for i in range(mapping.num_tokens)]
    if capacity:
        mapping.check_fits(capacity, model=model_name)
        return torch.tensor(tokenizer.convert_tokens_to_ids(names), dtype=torch.long), False
    old_rows = lm.get_input_embeddings().weight.shape[0]
    n_real = min(old_rows, len(tokenizer))
    tokenizer.add_tokens(names, special_tokens=True)
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(names), dtype=torch.long)
    if len(tokenizer) > old_rows:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
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
    return ids, True


def add_lora(lm, token_ids: torch.Tensor, **lora_kwargs):
    """LoRA on the attention (avg.retriever.llama.lora_config) + trainable image-token rows."""
    from peft import get_peft_model

    cfg = L.lora_config(lm, types.SimpleNamespace(voken_ids=token_ids), **lora_kwargs)
    try:
        return get_peft_model(lm, cfg)
    except ValueError as e:
        raise InputError(f"--lora-target-modules {cfg.target_modules}: {e}") from None


# ---------------------------------------------------------------------------- the module
class ScoreHead(nn.Module):
    def __init__(self, hidden_size: int, *, inner: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad position of each row (left or right padding)."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(1).long().argmax(1)


class Reranker(nn.Module):
    def __init__(self, lm, *, head_inner: int = 256, head_dropout: float = 0.1, fusion: str = "learned",
                 fusion_weight: float = 1.0):
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}")
        self.lm = lm
        cfg = L.search_model(lm).config
        hidden = int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)
        self.head = ScoreHead(hidden, inner=head_inner, dropout=head_dropout)
        self.fusion = fusion
        w = torch.tensor(float(fusion_weight if fusion != "none" else 0.0))
        if fusion == "learned":
            self.fusion_weight = nn.Parameter(w)
        else:
            self.register_buffer("fusion_weight", w)

    def body(self):
        """The transformer body of the causal LM (no output head); LoRA layers live inside it."""
        causal = L.search_model(self.lm)
        return getattr(causal, causal.base_model_prefix)

    def score_pairs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Head score of every (query, candidate) sequence [P] (float32)."""
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.body()(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        h = out.last_hidden_state
        last = h[torch.arange(h.shape[0], device=h.device), last_token_index(attention_mask)]
        return self.head(last.to(self.head.net[0].weight.dtype)).float()

    def score_shared_prefix(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, candidate_ids: torch.Tensor,
                            list_index: torch.Tensor) -> torch.Tensor:
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
        out = body(input_ids=candidate_ids, attention_mask=mask, position_ids=cand_pos, past_key_values=cache,
                   use_cache=True)
        last = out.last_hidden_state[:, -1]
        return self.head(last.to(self.head.net[0].weight.dtype)).float()

    def can_share_prefix(self) -> bool:
        """Gradient checkpointing drops the KV cache in training: use the flat path then."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        return not (self.training and any(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
                                          for m in self.body().modules()))

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                valid: Optional[torch.Tensor] = None, retriever_scores: Optional[torch.Tensor] = None,
                known: Optional[torch.Tensor] = None, prompt_ids: Optional[torch.Tensor] = None,
                prompt_mask: Optional[torch.Tensor] = None, candidate_ids: Optional[torch.Tensor] = None,
                list_index: Optional[torch.Tensor] = None, share_prefix: bool = True):
        """Pair scores [P]; with ``valid`` [B, K] (the fields of avg.reranker.data.ListCollator),
        (head, fused) scores per list [B, K] (-inf past a list's end). Uses the shared-prefix path
        when the prompt fields are given and allowed. Fusion runs inside forward so that DDP sees
        the learned fusion weight used."""
        if share_prefix and prompt_ids is not None and self.can_share_prefix():
            pair = self.score_shared_prefix(prompt_ids, prompt_mask, candidate_ids, list_index)
        else:
            pair = self.score_pairs(input_ids, attention_mask)
        if valid is None:
            return pair
        from avg.reranker.data import unflatten

        head = unflatten(pair, {"valid": valid})
        if retriever_scores is None:
            return head, head
        return head, self.fuse(head, retriever_scores, known)

    def fuse(self, head_scores: torch.Tensor, retriever_scores: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """``head + w * (s_ret - max known s_ret of the list)``; unknown retriever scores add nothing."""
        if self.fusion == "none":
            return head_scores
        r = retriever_scores.to(head_scores.device).float()
        known = known.to(head_scores.device)
        top = torch.where(known, r, torch.full_like(r, float("-inf"))).amax(1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        return head_scores + self.fusion_weight.float() * torch.where(known, r - top, torch.zeros_like(r))

    def head_config(self) -> dict:
        lin = self.head.net[0]
        return {"head_inner": lin.out_features, "head_dropout": float(self.head.net[2].p), "fusion": self.fusion,
                "fusion_weight": float(self.fusion_weight.detach())}


# ---------------------------------------------------------------------------- save / load
def save_reranker(reranker: Reranker, tokenizer, tokens: ImageTokens, out: str | os.PathLike, *, base_model: str,
                  prompt_template: str, max_length: int, image_tokens_added: bool, info: Optional[dict] = None) -> Path:
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
        state = {f"head.{k}": v.detach().float().cpu().contiguous() for k, v in reranker.head.state_dict().items()}
        state["fusion_weight"] = reranker.fusion_weight.detach().float().cpu().reshape(1)
        save_file(state, str(tmp / HEAD_FILE))
        tokens.save(tmp)
        rows = int(L.search_model(lm).get_input_embeddings().weight.shape[0])
        write_json({"base_model": str(base_model), "prompt_template": prompt_template, "lora": lora,
                    "max_length": int(max_length), "embedding_rows": rows, "tokenizer_size": len(tokenizer),
                    "image_tokens_added": bool(image_tokens_added), "image_token_map": tokens.mapping.to_dict(),
                    **reranker.head_config()}, tmp / META_FILE)
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
                        fusion=meta["fusion"], fusion_weight=float(meta["fusion_weight"]))
    state = load_file(str(path / HEAD_FILE))
    reranker.head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
    with torch.no_grad():
        reranker.fusion_weight.copy_(state["fusion_weight"].reshape(()))
    reranker.head.to(dtype=torch.float32)
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
              "candidate_ids", "list_index")


def model_inputs(batch: dict, device) -> dict:
    """The collated fields Reranker.forward takes, on `device`."""
    return {k: batch[k].to(device) for k in MODEL_KEYS if k in batch}


@torch.no_grad()
def score_lists(reranker: Reranker, dataset, batch_size: int, device, *, desc: str = "rerank",
                show_progress: bool = True, autocast=None, indices: Optional[Sequence[int]] = None,
                share_prefix: bool = True) -> dict:
    """Fused scores of every list of `dataset` (avg.reranker.data.ListDataset): {index: [scores]}.

    ``batch_size`` lists per forward pass (every candidate of a list in the same pass)."""
    import contextlib

    from tqdm.auto import tqdm

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
            _, fused = reranker(**model_inputs(batch, device), share_prefix=share_prefix)
        fused = fused.cpu()
        for b, i in enumerate(idx):
            out[i] = fused[b, : len(dataset.lists[i]["candidates"])].tolist()
    if was:
        reranker.train()
    return out


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
           "ensure_image_tokens", "add_lora", "ScoreHead", "last_token_index", "Reranker", "save_reranker",
           "load_reranker", "image_token_ids", "score_lists", "reranked_records"]
