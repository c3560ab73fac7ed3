"""Retriever data: the codes artifact, query files, tokenised datasets and batching.

The training target is the image's voken sequence followed by EOS (eq. 7: next-voken prediction
from the caption). Queries are tokenised once up front and padded per batch (dynamic padding),
so a training step costs one collate of a few small tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from avg.core.io import InputError, read_jsonl

SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------- generate_codes/ artifact
@dataclass
class CodesData:
    meta: dict                    # codes.json without "images"
    images: dict                  # image_id -> {"code": [ints], "split": str}
    codebook: Optional[np.ndarray]  # [n_books, N, latent_dim] or None when codebook.npy is absent


def read_codes(codes_dir: str | os.PathLike, *, with_codebook: bool = True) -> CodesData:
    """Read ``generate_codes/`` with avg.artifacts.codes (the one reader of that artifact) into a plain record.

    `codebook` is None when ``with_codebook`` is False or codebook.npy is absent (the
    ``--no-voken-embedding`` ablation needs no codebook). Errors name the file and the image.
    """
    from avg.artifacts.codes import CODEBOOK, load_codebook, load_codes

    codes = load_codes(codes_dir)
    path = Path(codes_dir) / "codes.json"
    for image_id, rec in codes.images.items():
        if rec["split"] not in SPLITS:
            raise InputError(f"{path}: image {image_id!r}: split must be one of {SPLITS}, got {rec['split']!r}")
    meta = {k: getattr(codes, k) for k in ("num_levels", "codebook_size", "shared_codebook", "code_len",
                                            "disambiguation", "disambiguation_size", "tie_rule", "encoder",
                                            "evidence_levels")}
    images = {str(i): {"code": [int(c) for c in rec["code"]], "split": rec["split"]} for i, rec in codes.images.items()}
    codebook = None
    if with_codebook and (Path(codes_dir) / CODEBOOK).is_file():
        codebook = load_codebook(codes_dir, codes)
    return CodesData(meta=meta, images=images, codebook=codebook)


# ---------------------------------------------------------------------------- query files
def load_queries(path: str | os.PathLike, *, code_len: Optional[int] = None) -> list[dict]:
    """Read a ``{split}.jsonl`` of {"query", "image_id", "code"}; errors name the file and line."""
    path = Path(path)
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, 1):
        q, image_id, code = row.get("query"), row.get("image_id"), row.get("code")
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"{path}: record {lineno}: 'query' must be a non-empty string")
        if not isinstance(image_id, str) or not image_id:
            raise InputError(f"{path}: record {lineno}: 'image_id' must be a non-empty string")
        if not isinstance(code, list) or not all(isinstance(c, int) and c >= 0 for c in code) or not code:
            raise InputError(f"{path}: record {lineno}: 'code' must be a list of non-negative ints")
        if code_len is not None and len(code) != code_len:
            raise InputError(f"{path}: record {lineno}: code has length {len(code)}, expected {code_len}")
    return rows


# ---------------------------------------------------------------------------- tokenised data
class QueryDataset(torch.utils.data.Dataset):
    """Pre-tokenised queries with their voken targets (token ids + EOS, eq. 7)."""

    def __init__(self, queries: Sequence[dict], tokenizer, vocab, *, max_length: int = 64):
        self.queries = list(queries)
        enc = tokenizer([q["query"] for q in self.queries], truncation=True, max_length=max_length,
                        add_special_tokens=True)
        self.input_ids = [list(ids) for ids in enc["input_ids"]]
        codes = np.array([q["code"] for q in self.queries], dtype=np.int64).reshape(len(self.queries), vocab.code_len)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise InputError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token")
        voken = vocab.code_to_token_ids(codes)
        self.labels = torch.cat([voken, torch.full((len(self.queries), 1), eos, dtype=torch.long)], dim=1)
        self.codes = torch.from_numpy(codes)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> int:
        return i  # the collator gathers by index: no per-item dicts


class Collator:
    """Pad a batch of dataset indices to its longest query (dynamic padding)."""

    def __init__(self, dataset: QueryDataset, pad_token_id: int):
        self.ds, self.pad = dataset, int(pad_token_id)

    def __call__(self, idx: Sequence[int]) -> dict:
        seqs = [self.ds.input_ids[i] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        index = torch.as_tensor(list(idx), dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": self.ds.labels[index],
                "codes": self.ds.codes[index], "index": index}


__all__ = ["CodesData", "read_codes", "load_queries", "QueryDataset", "Collator", "SPLITS"]
