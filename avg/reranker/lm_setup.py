"""The reranker's LM set-up: its image tokens (``<img_NNNNN>``, SEED-LLaMA's ``<img>`` ... ``</img>``
wrapper), LoRA on top, and freezing an untied output head the reranker never runs.

``ensure_image_tokens`` re-initialises the rows of the image tokens it uses -- from the codebook or
seeded noise -- even where SEED-LLaMA already has ``<img_k>`` tokens: SEED's code k is not voken k
(``reuse_rows`` keeps SEED's rows, by explicit choice).
"""
from __future__ import annotations

import types
from typing import Optional

import numpy as np
import torch

from avg.reranker.image_tokens import ImageTokenMap, image_token
from avg.retriever import llama as L
from avg.retriever.vocab import project_codebook
from avg.core.io import InputError


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


def freeze_unused_head(lm) -> bool:
    """Full fine-tuning: an untied output head is never run by the reranker; freeze it so that no
    trainable parameter goes without a gradient (DDP's reducer requires every one to get one).
    Returns whether a head was frozen (a tied head is the input embedding and stays trainable)."""
    if L.embeddings_tied(lm):
        return False
    lm.get_output_embeddings().weight.requires_grad_(False)
    return True


__all__ = ["image_token_capacity", "ensure_image_tokens", "IMAGE_WRAP", "image_wrap_ids", "add_lora", "freeze_unused_head"]
