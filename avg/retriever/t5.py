"""A seq2seq (T5) retriever: the model train_t5 starts from, the folder it writes, and loading it
back to search.

Folder (``<out-dir>/best``): ``save_pretrained`` model + tokenizer, ``voken_vocab.json``,
``best.json`` (epoch, selection metric, ``score``: how codes are scored), and, when the retriever
reads the query's CLIP text feature, ``query_prefix.{safetensors,json}`` (avg.retriever.prefix).
Everything that searches with a T5 retriever (its own test, the reranker's lists, the efficiency
benchmark) loads it here, so a model is always scored the way it was trained.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from avg.retriever.prefix import QueryPrefix, load_prefix, save_prefix
from avg.retriever.vocab import VOCAB_FILE, VokenVocab
from avg.core.io import InputError, read_json, replace_dir, write_json

INFO_FILE = "best.json"


@dataclass
class T5Retriever:
    model: object
    tokenizer: object
    vocab: VokenVocab
    prefix: Optional[QueryPrefix]
    normalize: str           # "children" or "vocab" (avg.search.beam)
    max_length: int = 64
    encoder: Optional[dict] = None  # the CLIP text encoder of the prefix's features

    @property
    def needs_features(self) -> bool:
        return self.prefix is not None

    def eval_kwargs(self) -> dict:
        """Keyword arguments of avg.retriever.evaluate.evaluate_split for this retriever."""
        return {"normalize": self.normalize, "prefix": self.prefix, "max_length": self.max_length}


def save_t5_retriever(model, tokenizer, vocab: VokenVocab, out: str | os.PathLike, info: dict, *,
                      prefix: Optional[QueryPrefix] = None, encoder: Optional[dict] = None) -> Path:
    """Write the folder (module docstring), swapped into place atomically."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(vocab.to_dict(), tmp / VOCAB_FILE)
        if prefix is not None:
            save_prefix(prefix, tmp, encoder=encoder)
        write_json(info, tmp / INFO_FILE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, out)


def load_t5_retriever(path: str | os.PathLike, device=None) -> T5Retriever:
    """A saved T5 retriever in eval mode on ``device``."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / VOCAB_FILE).is_file():
        raise InputError(f"{path}: not a saved T5 retriever (needs config.json and {VOCAB_FILE})")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path)
    vocab = VokenVocab.load(path, tokenizer)
    prefix, cfg = load_prefix(path)
    info = read_json(path / INFO_FILE) if (path / INFO_FILE).is_file() else {}
    if device is not None:
        model = model.to(device)
        prefix = prefix.to(device) if prefix is not None else None
    model.eval()
    return T5Retriever(model, tokenizer, vocab, prefix, str(info.get("score", "vocab")),
                       int(info.get("max_source_length", 64)), cfg.get("encoder") or None)


def load_model_and_vocab(args, log):
    """train_t5's model: stage 1, a base checkpoint (``--model``) with the vokens of ``--codes-dir``
    added (rows from the codebook) and a fresh query prefix; stage 2 (or ``--init-from``), a saved
    retriever with its vokens and prefix. Returns (tokenizer, model, vocab, prefix)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from avg.retriever.data import read_codes

    if args.stage == 2 or (args.init_from and args.stage == 1):
        if not args.init_from:
            raise InputError("--stage 2 needs --init-from <stage-1 out-dir>/best")
        src = args.init_from
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForSeq2SeqLM.from_pretrained(src)
        vocab = VokenVocab.load(src, tokenizer)
        prefix, _ = load_prefix(src)
        if args.query_prefix and prefix is None:
            raise InputError(f"--query-prefix {args.query_prefix}: {src} was trained without a query prefix")
        log.info("loaded retriever %s (%d vokens%s)", src, len(vocab.tokens()),
                 f", query prefix of {prefix.num_tokens} tokens" if prefix is not None else "")
        return tokenizer, model, vocab, prefix
    if not args.codes_dir:
        raise InputError("stage 1 needs --codes-dir (voken metadata and codebook.npy)")
    codes = read_codes(args.codes_dir, with_codebook=not args.no_voken_embedding)
    vocab = VokenVocab.from_meta(codes.meta, source=os.path.join(args.codes_dir, "codes.json"))
    vocab.level_tokens = vocab.shared_codebook and args.voken_tokens == "per-level"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model)
    if not getattr(model.config, "is_encoder_decoder", False):
        raise InputError(f"--model {args.model}: not an encoder-decoder model (use the LLaMA retriever)")
    init = "random" if args.no_voken_embedding else "codebook"
    if init == "codebook" and codes.codebook is None:
        raise InputError(f"{args.codes_dir}: codebook.npy not found (or pass --no-voken-embedding)")
    vocab.add_to(tokenizer, model, codes.codebook, init=init, seed=args.seed)
    log.info("added %d voken tokens to %s (init=%s, %s tokens)", len(vocab.tokens()), args.model, init,
             "per-level" if vocab.level_tokens or not vocab.shared_codebook else "shared")
    prefix = None
    if args.query_prefix:
        torch.manual_seed(args.seed)
        prefix = QueryPrefix(args.feature_dim, model.get_input_embeddings().weight.shape[1], args.query_prefix)
    return tokenizer, model, vocab, prefix


def val_signature(args, queries, gallery, features, mixed_precision: str, num_processes: int) -> str:
    """A digest of everything a val evaluation's result depends on besides the model's weights: the
    queries, the gallery (image order, codes, the tie order's seed), the query features and the search
    settings. best.json records it next to the val metrics of the weights saved with it, so stage 2
    can reuse stage 1's evaluation of its starting model instead of running it again."""
    h = hashlib.sha1()
    settings = {"num_beams": args.num_beams, "score": args.score, "fast_search": bool(args.fast_search),
                "max_source_length": args.max_source_length, "eval_batch_size": args.eval_batch_size,
                "mixed_precision": str(mixed_precision), "num_processes": int(num_processes), "gallery_seed": gallery.seed}
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(json.dumps([[q["query"], q["image_id"]] for q in queries]).encode())
    h.update(json.dumps([gallery.image_ids, gallery.codes.tolist()]).encode())
    if features is not None:
        h.update(np.ascontiguousarray(features.detach().cpu().float().numpy()).tobytes())
    return h.hexdigest()


def recorded_val_eval(init_from, signature: str) -> Optional[tuple[dict, Path]]:
    """The starting model's val evaluation as the stage that saved it recorded it -- (its eval/val/*
    metrics, its run file) -- when best.json's ``val_signature`` equals ``signature``; else None."""
    info_path = Path(init_from) / INFO_FILE
    info = read_json(info_path) if info_path.is_file() else {}
    metrics = {k: v for k, v in (info.get("metrics") or {}).items() if k.startswith("eval/val/")}
    run_file = Path(init_from).parent / "eval" / f"run_val_epoch{info.get('epoch')}.jsonl"
    if info.get("val_signature") != signature or "eval/val/R@1" not in metrics or not run_file.is_file():
        return None
    return metrics, run_file


__all__ = ["T5Retriever", "save_t5_retriever", "load_t5_retriever", "INFO_FILE", "load_model_and_vocab",
           "val_signature", "recorded_val_eval"]
