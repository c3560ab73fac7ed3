"""Pseudo queries by caption transfer.

For each image of a chosen split, the captions of its nearest *training* images (cosine similarity
of CLIP image features) become extra text queries for that image. Applied to the val/test gallery
this is transductive: it uses the evaluation images (never their captions), so every record
carries ``transductive: true`` and downstream stages log it loudly.
"""
from __future__ import annotations


import numpy as np
import torch

from avg.search.exact import exact_search
from avg.artifacts.emb import Embeddings

TRANSDUCTIVE_SPLITS = ("val", "test")


def caption_transfer(
    emb: Embeddings,
    split: str,
    *,
    neighbors: int = 3,
    per_image: int = 5,
    batch_size: int = 1024,
    device: str = "auto",
) -> list[dict]:
    """Return pseudo-query records ``{query, image_id, source_image_id, split, transductive}``.

    Neighbours are taken among training images only; when ``split`` is ``train`` an image is never
    its own neighbour. Captions are taken neighbour by neighbour (nearest first), skipping
    duplicates, until ``per_image`` queries are collected.
    """
    target_rows = emb.image_rows(split)
    source_rows = emb.image_rows("train")
    if len(target_rows) == 0:
        raise ValueError(f"no images in split {split!r}")
    if len(source_rows) == 0:
        raise ValueError("no training images to transfer captions from")
    captions = emb.captions_per_image()
    k = min(neighbors + (1 if split == "train" else 0), len(source_rows))
    feats = lambda rows: torch.from_numpy(np.ascontiguousarray(emb.image_features[rows], dtype=np.float32))  # noqa: E731
    top_idx, _ = exact_search(feats(target_rows), feats(source_rows), k=k, batch_size=batch_size, device=device)
    top_idx = np.asarray(top_idx)
    transductive = split in TRANSDUCTIVE_SPLITS
    records = []
    for t, row in enumerate(target_rows):
        image_id = emb.images[row]["image_id"]
        seen: set = set()
        taken = 0
        for j in top_idx[t]:
            src_row = int(source_rows[j])
            if src_row == row:
                continue
            for cap_row in captions[src_row]:
                text = emb.captions[cap_row]["text"]
                if text in seen:
                    continue
                seen.add(text)
                records.append({"query": text, "image_id": image_id, "source_image_id": emb.images[src_row]["image_id"], "split": split, "transductive": transductive})
                taken += 1
                if taken >= per_image:
                    break
            if taken >= per_image:
                break
    return records
