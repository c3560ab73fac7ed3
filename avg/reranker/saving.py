"""A trained reranker's folder: written atomically by ``save_reranker``, read back by ``load_reranker``.

Tokenizer (with the image tokens), ``reranker.json`` (base model, template, LoRA or full, head and
fusion settings, the image-token map), ``head.safetensors`` (heads + fusion weights),
``image_tokens.json`` (every image's token indices, so the folder is self-contained) and either a
peft adapter (LoRA + trainable image-token rows) or a full model.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from avg.reranker.image_tokens import ImageTokens
from avg.reranker.model import Reranker
from avg.retriever import llama as L
from avg.core.io import InputError, read_json, replace_dir, write_json

META_FILE = "reranker.json"
HEAD_FILE = "head.safetensors"


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
        name = base_model or meta["base_model"]
        try:
            lm = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except OSError as e:
            raise InputError(f"{path / META_FILE}: cannot load base model {name!r} ({e}); pass --base-model") from None
        lm = L.load_adapter(lm, path, int(meta.get("embedding_rows") or len(tokenizer)), merge=merge)
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
        reranker.fusion_weight.copy_(state["fusion_weight"].reshape(reranker.fusion_weight.shape))
        if "embed_weight" in state:
            reranker.embed_weight.copy_(state["embed_weight"].reshape(reranker.embed_weight.shape))
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


__all__ = ["META_FILE", "HEAD_FILE", "save_reranker", "load_reranker", "image_token_ids"]
