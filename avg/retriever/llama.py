"""The decoder-only generative retriever: any HF causal LM (LLaMA family and others) + LoRA.

The paper's Table 6 variant (LLaMA-7B + LoRA). The caption goes into a prompt template and the
model continues the prompt with the image's vokens and EOS (eq. 7, next-voken prediction); the
loss covers those L + 1 response tokens only (prompt and padding are -100).

New tokens and LoRA: a low-rank update of the attention weights cannot give brand-new tokens an
embedding or an output row, so the voken rows of the input embedding (and of the output head
when it is not tied to it) are trained as well, through
``LoraConfig(trainable_token_indices=...)`` (peft >= 0.18; older releases break on an untied
head): only those rows are trainable and saved (one row per voken per matrix, not whole
matrices). The adapter stores the rows' values (not deltas), so reloading = base model resized
to the saved vocabulary + adapter reproduces the trained model bit for bit (tested).

Prompts are truncated from the LEFT (``tokenizer.truncation_side = "left"``): a long caption
loses its first words, never the end of the template that the vokens follow. Training batches
are right-padded; the search left-pads (avg.retriever.evaluate), with positions from the mask.

Saved retriever folder (``save_retriever``): tokenizer (with the vokens), ``voken_vocab.json``,
``llama_retriever.json`` (base model, prompt template, LoRA or full) and either a peft adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) or, after ``--full-finetune``, a full
``save_pretrained`` model.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from avg.retriever.data import QueryDataset
from avg.retriever.vocab import VOCAB_FILE, VokenVocab
from avg.core.io import InputError, read_json, replace_dir, write_json
from avg.core.seed import seeded_subset

DEFAULT_PROMPT_TEMPLATE = "Caption: {query}\nImage:"
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj"
RETRIEVER_FILE = "llama_retriever.json"
IGNORE_INDEX = -100
#: the system name the LLaMA retriever writes into its metrics and run files
SYSTEM = "avg_llama"


def query_subset(queries: list, n: int, seed: int, salt: int) -> list:
    """A seeded random subset of N queries in their original order, each tagged with its qid."""
    return seeded_subset([dict(q, qid=q.get("qid", i)) for i, q in enumerate(queries)], n, seed, salt)


# ---------------------------------------------------------------------------- prompts
def check_template(template: str) -> str:
    if not isinstance(template, str) or template.count("{query}") != 1:
        raise InputError(f"--prompt-template must contain '{{query}}' exactly once, got {template!r}")
    return template


def format_prompt(template: str, query: str) -> str:
    """The model input for a caption (plain replace: braces elsewhere in the template are literal)."""
    return template.replace("{query}", query.strip())


def prompt_formatter(template: str):
    check_template(template)
    return lambda query: format_prompt(template, query)


# ---------------------------------------------------------------------------- tokenizer / model
def prepare_tokenizer(tokenizer):
    """Decoder-only conventions: a pad token (EOS when the model has none; padding is masked
    anyway), prompts truncated from the left, left padding for generation."""
    if tokenizer.eos_token_id is None:
        raise InputError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = "left"
    tokenizer.padding_side = "left"
    return tokenizer


def deterministic_generation_config(model, tokenizer=None):
    """Replace the checkpoint's generation_config (SmolLM2's, e.g., sets do_sample=True,
    temperature and top_p) by an explicit greedy one. The constrained search never reads it;
    this keeps any later ``model.generate`` call on a retriever deterministic too."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer is not None else getattr(model.config, "pad_token_id", None)
    model.generation_config = GenerationConfig(do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad,
                                               bos_token_id=getattr(model.config, "bos_token_id", None))
    return model


def resolve_dtype(name: str, *, lora: bool, device: torch.device) -> torch.dtype:
    """'auto': bf16 weights for LoRA on a bf16-capable GPU (the frozen base), float32 otherwise
    (full fine-tuning keeps fp32 master weights; bf16 then comes from --mixed-precision)."""
    if name == "auto":
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if (lora and gpu_bf16) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_causal_lm(name_or_path: str, *, dtype: torch.dtype = torch.float32):
    """Tokenizer + causal LM from a hub name or a local folder; refuses encoder-decoders."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(name_or_path)
    if getattr(config, "is_encoder_decoder", False):
        raise InputError(f"--model {name_or_path}: an encoder-decoder model (use avg.stages.train_retriever_t5)")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(name_or_path))
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    return tokenizer, deterministic_generation_config(model, tokenizer)


def add_vokens(tokenizer, model, vocab: VokenVocab, codebook: Optional[np.ndarray], *, random_init: bool = False,
               seed: int = 0) -> VokenVocab:
    """New voken tokens, embeddings from the codebook (the paper's init; ``random_init``: the
    no-voken-embedding ablation). The one implementation is VokenVocab.add_to."""
    return vocab.add_to(tokenizer, model, None if random_init else codebook,
                        init="random" if random_init else "codebook", seed=seed)


def enable_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant: works with a frozen embedding under LoRA)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def embeddings_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is None or out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _module_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def token_row_targets(model, token_ids: Sequence[int], *, output_rows: bool = True) -> dict[str, list[int]]:
    """{module name: rows} for peft's trainable_token_indices: the input embedding, and the
    output head when it is a separate matrix (a tied head follows the embedding) and the model
    runs it (``output_rows``: the retriever generates vokens; the reranker reads hidden states and
    never calls the head, so trainable rows there would get no gradient -- and DDP stops on
    parameters that never receive one)."""
    ids = sorted(int(i) for i in token_ids)
    targets = {_module_name(model, model.get_input_embeddings()): ids}
    if output_rows and not embeddings_tied(model):
        targets[_module_name(model, model.get_output_embeddings())] = ids
    return targets


def lora_config(model, vocab: VokenVocab, *, r: int = 8, alpha: int = 16, dropout: float = 0.05,
                target_modules: str | Sequence[str] = DEFAULT_LORA_TARGETS, output_rows: bool = True):
    """A causal-LM LoraConfig whose voken rows train too (trainable_token_indices; in the output
    head as well unless ``output_rows`` is False, see token_row_targets)."""
    from peft import LoraConfig, TaskType

    if isinstance(target_modules, str):
        target_modules = target_modules if target_modules == "all-linear" else [
            t.strip() for t in target_modules.split(",") if t.strip()]
    rows = token_row_targets(model, vocab.voken_ids.tolist(), output_rows=output_rows)
    if "trainable_token_indices" not in {f.name for f in dataclasses.fields(LoraConfig)}:
        raise RuntimeError("the LoRA retriever needs peft >= 0.18 (LoraConfig.trainable_token_indices, "
                           "with the untied lm_head fix of huggingface/peft#2863)")
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=target_modules, trainable_token_indices=rows)


def add_lora(model, vocab: VokenVocab, **lora_kwargs):
    """Wrap `model` in a PeftModel: LoRA on `target_modules` + trainable voken rows."""
    from peft import get_peft_model

    cfg = lora_config(model, vocab, **lora_kwargs)
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # e.g. no module matches the target names
        raise InputError(f"--lora-target-modules {cfg.target_modules}: {e}") from None


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def search_model(model):
    """The module to run the search on: a PeftModel's underlying causal LM (LoRA layers live
    inside it and stay active; its forward takes ``logits_to_keep``)."""
    return model.get_base_model() if is_peft(model) else model


# ---------------------------------------------------------------------------- training data
def prompt_dataset(queries: Sequence[dict], tokenizer, vocab: VokenVocab, template: str, *,
                   max_length: int = 96) -> QueryDataset:
    """Tokenised prompts and voken + EOS targets (avg.retriever.data.QueryDataset over the
    formatted prompts, so training and the search tokenise prompts identically)."""
    fmt = prompt_formatter(template)
    return QueryDataset([dict(q, query=fmt(q["query"])) for q in queries], tokenizer, vocab, max_length=max_length)


def build_causal_batch(prompts: Sequence[Sequence[int]], targets: torch.Tensor, pad_token_id: int) -> dict:
    """Right-padded ``prompt + target`` rows; labels are the target tokens (code + EOS), -100
    on the prompt and the padding, so the loss is eq. 7 over the response only."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    rows = [list(p) + targets[r].tolist() for r, p in enumerate(prompts)]
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (p, x) in enumerate(zip(prompts, rows)):
        ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[r, : len(x)] = 1
        labels[r, len(p): len(x)] = targets[r]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class CausalCollator:
    """Batch of dataset indices -> right-padded prompt + code + EOS with masked labels."""

    def __init__(self, dataset: QueryDataset, pad_token_id: int):
        self.ds, self.pad = dataset, int(pad_token_id)

    def __call__(self, idx: Sequence[int]) -> dict:
        index = torch.as_tensor(list(idx), dtype=torch.long)
        batch = build_causal_batch([self.ds.input_ids[i] for i in idx], self.ds.labels[index], self.pad)
        batch["index"] = index
        return batch


# ---------------------------------------------------------------------------- save / load
def _normalise_permissions(folder: Path) -> None:
    mode = 0o666 & ~_umask()
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_retriever(model, tokenizer, vocab: VokenVocab, out: str | os.PathLike, *, base_model: str,
                   prompt_template: str, max_length: int, info: Optional[dict] = None) -> Path:
    """Write a retriever folder (see module docstring), swapped into place atomically.

    A PeftModel saves only its adapter (LoRA + voken rows; ``save_embedding_layers=False``: the
    rows are in the adapter); a plain model saves everything."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lora = is_peft(model)
    try:
        if lora:
            model.save_pretrained(tmp, save_embedding_layers=False)
        else:
            deterministic_generation_config(model, tokenizer)
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(vocab.to_dict(), tmp / VOCAB_FILE)
        emb_rows = int(search_model(model).get_input_embeddings().weight.shape[0])
        write_json({"base_model": str(base_model), "prompt_template": prompt_template, "lora": lora,
                    "max_length": int(max_length), "embedding_rows": emb_rows,
                    "tokenizer_size": len(tokenizer)}, tmp / RETRIEVER_FILE)
        if info is not None:
            write_json(info, tmp / "best.json")
        _normalise_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, out)


def read_retriever_meta(path: str | os.PathLike) -> dict:
    meta = read_json(Path(path) / RETRIEVER_FILE)
    for key in ("base_model", "prompt_template", "lora"):
        if key not in meta:
            raise InputError(f"{Path(path) / RETRIEVER_FILE}: missing key {key!r}")
    check_template(meta["prompt_template"])
    return meta


def load_adapter(model, path: str | os.PathLike, rows: int, *, merge: bool = True):
    """The peft adapter saved in ``path`` on its base ``model``: the base is resized to the ``rows``
    embedding rows the adapter was saved with first (added tokens), then the adapter is loaded
    frozen and, with ``merge``, folded into plain weights."""
    from peft import PeftModel

    if rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    model.config.vocab_size = rows
    model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    return model.merge_and_unload() if merge else model


def load_retriever(path: str | os.PathLike, *, base_model: Optional[str] = None, merge: bool = True,
                   dtype: torch.dtype = torch.float32, device=None):
    """Load a saved retriever -> (tokenizer, model, vocab, meta), model in eval mode.

    LoRA folders: the base model (``base_model`` overrides the recorded one, e.g. a moved local
    copy) is resized to the saved vocabulary BEFORE the adapter is loaded; ``merge`` folds LoRA
    and the voken rows into plain weights (a faster search, and the output head becomes the
    nn.Linear the search's fast path needs); ``merge=False`` keeps the PeftModel.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta = read_retriever_meta(path)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    vocab = VokenVocab.load(path, tokenizer)
    if meta["lora"]:
        base_name = base_model or meta["base_model"]
        try:
            model = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype)
        except OSError as e:
            raise InputError(f"{path / RETRIEVER_FILE}: cannot load base model {base_name!r} ({e}); "
                             f"pass --base-model") from None
        rows = int(meta.get("embedding_rows") or max(len(tokenizer), model.get_input_embeddings().weight.shape[0]))
        model = load_adapter(model, path, rows, merge=merge)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    deterministic_generation_config(search_model(model), tokenizer)
    if device is not None:
        model = model.to(device)
    model.eval()
    return tokenizer, model, vocab, meta


__all__ = ["DEFAULT_PROMPT_TEMPLATE", "DEFAULT_LORA_TARGETS", "RETRIEVER_FILE", "IGNORE_INDEX", "SYSTEM", "query_subset", "check_template",
           "format_prompt", "prompt_formatter", "prepare_tokenizer", "deterministic_generation_config",
           "resolve_dtype", "load_causal_lm", "add_vokens", "enable_checkpointing", "embeddings_tied", "token_row_targets", "lora_config",
           "add_lora", "is_peft", "search_model", "prompt_dataset", "build_causal_batch", "CausalCollator",
           "save_retriever", "read_retriever_meta", "load_adapter", "load_retriever"]
