"""A saved seq2seq (T5) retriever: the folder train_t5 writes, and loading it back to search.

Folder (``<out-dir>/best``): ``save_pretrained`` model + tokenizer, ``voken_vocab.json``,
``best.json`` (epoch, selection metric, ``score``: how codes are scored), and, when the retriever
reads the query's CLIP text feature, ``query_prefix.{safetensors,json}`` (avg.retriever.prefix).
Everything that searches with a T5 retriever (its own test, the reranker's lists, the efficiency
benchmark) loads it here, so a model is always scored the way it was trained.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from avg.retriever.prefix import QueryPrefix, load_prefix, save_prefix
from avg.retriever.vocab import VOCAB_FILE, VokenVocab
from avg.utils.io import InputError, read_json, replace_dir, write_json

INFO_FILE = "best.json"


@dataclass
class T5Retriever:
    model: object
    tokenizer: object
    vocab: VokenVocab
    prefix: Optional[QueryPrefix]
    normalize: str           # "children" or "vocab" (avg.retriever.search)
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


__all__ = ["T5Retriever", "save_t5_retriever", "load_t5_retriever", "INFO_FILE"]
