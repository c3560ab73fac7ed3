"""Query-feature prefix: the query's frozen CLIP text feature as soft tokens before its words.

A randomly initialised (or small) seq2seq retriever has to learn language from the training
captions alone; the CLIP text tower that made the features already maps a caption near its image.
GENIUS (CVPR'25) feeds the query's CLIP embedding to its decoder; here a learned linear map turns
the feature ``t`` [D] into ``P`` embeddings of the LM's width, put in front of the caption's token
embeddings: ``inputs_embeds = [W t (P rows); embed(caption)]``. The encoder reads both, so the
model can use CLIP's text understanding and still read the words. Off in the paper's setting
(``--query-prefix 0``); its results are reported as their own row.

The features are the rows of ``prepare_emb/text_features.npy`` named by each query's ``text_row``
(``avg.stages.prepare_retriever_dataset --emb-dir``); a new query is encoded by the CLIP text tower that
``prepare_emb/index.json`` names. Saved beside the retriever as ``query_prefix.safetensors`` +
``query_prefix.json``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from avg.core.io import InputError, read_json, write_json

PREFIX_WEIGHTS = "query_prefix.safetensors"
PREFIX_CONFIG = "query_prefix.json"


class QueryPrefix(nn.Module):
    """Linear map of a [B, D] feature batch to [B, P, H] soft tokens (no I/O)."""

    def __init__(self, feature_dim: int, hidden_size: int, num_tokens: int):
        super().__init__()
        if feature_dim < 1 or hidden_size < 1 or num_tokens < 1:
            raise ValueError(f"QueryPrefix: feature_dim, hidden_size and num_tokens must be >= 1, got "
                             f"{feature_dim}, {hidden_size}, {num_tokens}")
        self.feature_dim, self.hidden_size, self.num_tokens = int(feature_dim), int(hidden_size), int(num_tokens)
        self.proj = nn.Linear(self.feature_dim, self.num_tokens * self.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"query features must be [batch, {self.feature_dim}], got {tuple(features.shape)}")
        out = self.proj(features.to(self.proj.weight.dtype))
        return out.view(features.shape[0], self.num_tokens, self.hidden_size)

    def config(self) -> dict:
        return {"feature_dim": self.feature_dim, "hidden_size": self.hidden_size, "num_tokens": self.num_tokens}


def prefixed_inputs(model, prefix: Optional[QueryPrefix], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    features: Optional[torch.Tensor]) -> dict:
    """Model inputs for a batch of tokenised queries: ``{"input_ids", "attention_mask"}`` without a
    prefix, else ``{"inputs_embeds", "attention_mask"}`` with the P soft tokens in front (their mask
    is 1; right-padded captions stay right-padded behind them)."""
    if prefix is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    if features is None:
        raise ValueError("this retriever has a query-feature prefix: pass each query's CLIP text feature")
    if features.shape[0] != input_ids.shape[0]:
        raise ValueError(f"{features.shape[0]} query features for {input_ids.shape[0]} queries")
    words = model.get_input_embeddings()(input_ids)
    soft = prefix(features.to(words.device)).to(words.dtype)
    mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], prefix.num_tokens), attention_mask], dim=1)
    return {"inputs_embeds": torch.cat([soft, words], dim=1), "attention_mask": mask}


def save_prefix(prefix: QueryPrefix, directory: str | os.PathLike, *, encoder: Optional[dict] = None) -> None:
    """Write ``query_prefix.safetensors`` + ``query_prefix.json`` (with the text encoder that made the features)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in prefix.state_dict().items()},
              str(directory / PREFIX_WEIGHTS))
    write_json({**prefix.config(), "encoder": encoder or {}}, directory / PREFIX_CONFIG)


def load_prefix(directory: str | os.PathLike) -> tuple[Optional[QueryPrefix], dict]:
    """(prefix, config) of a saved retriever; (None, {}) when it has no prefix."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path = directory / PREFIX_CONFIG
    if not cfg_path.is_file():
        return None, {}
    cfg = read_json(cfg_path)
    try:
        prefix = QueryPrefix(int(cfg["feature_dim"]), int(cfg["hidden_size"]), int(cfg["num_tokens"]))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{cfg_path}: bad query-prefix config ({e})") from None
    weights = directory / PREFIX_WEIGHTS
    if not weights.is_file():
        raise InputError(f"{weights}: not found (the retriever's {PREFIX_CONFIG} says it has a query prefix)")
    try:
        prefix.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise InputError(f"{weights}: does not match {cfg_path} ({e})") from None
    return prefix.eval(), cfg


def feature_rows(queries, num_rows: int, source: str = "queries") -> np.ndarray:
    """int64 [n]: each query's ``text_row``, checked (the error names the file and record)."""
    rows = np.empty(len(queries), dtype=np.int64)
    for i, q in enumerate(queries):
        row = q.get("text_row")
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < num_rows:
            raise InputError(f"{source}: record {i + 1} ({q.get('query')!r}) has no CLIP text feature (text_row "
                             f"{row!r}); rebuild prepare_retriever_dataset/ with --emb-dir, or train without --query-prefix "
                             "(pseudo queries never have one: they are not captions of prepare_emb/)")
        rows[i] = row
    return rows


def gather_features(text_features: np.ndarray, rows) -> torch.Tensor:
    """float32 [n, D] rows of the (memory-mapped) feature array."""
    return torch.from_numpy(np.asarray(text_features[np.asarray(rows, dtype=np.int64)], dtype=np.float32))


def query_features(text_features: np.ndarray, queries, source: str = "queries") -> torch.Tensor:
    """float32 [n, D] rows of ``prepare_emb/text_features.npy`` for each query's ``text_row``."""
    return gather_features(text_features, feature_rows(queries, text_features.shape[0], source))


def emb_dir_for(data_dir: str | os.PathLike, emb_dir: Optional[str | os.PathLike] = None) -> str:
    """The prepare_emb/ folder whose captions a prepare_retriever_dataset/ folder's queries point into: ``emb_dir``, or
    the one its meta.json was built from (an InputError when it was built without one)."""
    if emb_dir is not None:
        return os.fspath(emb_dir)
    meta_path = Path(data_dir) / "meta.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    found = (meta.get("sources") or {}).get("emb_dir")
    if not found or not meta.get("text_rows"):
        raise InputError(f"{meta_path}: built without --emb-dir, so its queries have no CLIP text features; "
                         "rebuild it (scripts/prepare_retriever_dataset.sh passes prepare_emb/) or pass --emb-dir")
    return str(found)


def emb_for(data_dir: str | os.PathLike, emb_dir: Optional[str | os.PathLike] = None):
    """The prepare_emb/ folder (:class:`~avg.artifacts.emb.Embeddings`, memory-mapped) of :func:`emb_dir_for`."""
    from avg.artifacts.emb import load_emb

    return load_emb(emb_dir_for(data_dir, emb_dir))


def text_features_for(data_dir: str | os.PathLike, emb_dir: Optional[str | os.PathLike] = None) -> tuple[np.ndarray, dict]:
    """(memory-mapped ``prepare_emb/text_features.npy``, the text encoder's record) for the queries of a
    prepare_retriever_dataset/ folder: ``emb_dir``, or the prepare_emb/ folder its meta.json was built from."""
    emb = emb_for(data_dir, emb_dir)
    return emb.text_features, dict(emb.index.get("encoder") or {})


__all__ = ["emb_dir_for", "emb_for", "feature_rows", "gather_features", "text_features_for", "QueryPrefix", "prefixed_inputs", "save_prefix", "load_prefix", "query_features", "PREFIX_WEIGHTS",
           "PREFIX_CONFIG"]
