"""Exact two-tower search: each query's top-k gallery rows by inner product (the cosine, for the
L2-normalised features of prepare_emb/), batched over queries, ties to the lower row. The CLIP baseline,
pseudo-query mining and the demo CLIP's check all rank this way."""
from __future__ import annotations

import numpy as np
import torch

from avg.core.progress import tqdm


def exact_search(
    text_feats,
    image_feats,
    k: int = 10,
    batch_size: int = 1024,
    device: str = "auto",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` images per query by inner product, batched over queries.

    Returns ``(top_idx [Q, k] int64, top_scores [Q, k] float32)``, best first; ties go to the
    lower image row (a stable, documented rule). Runs in fp16 on a GPU, float32 on the CPU.
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    images = torch.as_tensor(np.asarray(image_feats), dtype=torch.float32).to(dev, dtype)
    n_queries, n_images = len(text_feats), images.shape[0]
    if n_images == 0:
        raise ValueError("exact_search: empty gallery")
    k = min(int(k), n_images)
    top_idx = np.empty((n_queries, k), dtype=np.int64)
    top_scores = np.empty((n_queries, k), dtype=np.float32)
    starts = range(0, n_queries, batch_size)
    for start in tqdm(starts, desc="exact search", disable=not progress, unit="batch"):
        q = torch.as_tensor(np.asarray(text_feats[start:start + batch_size]), dtype=torch.float32).to(dev, dtype)
        scores = (q @ images.T).float()
        order = _stable_topk(scores, k)
        top_idx[start:start + len(q)] = order.cpu().numpy()
        top_scores[start:start + len(q)] = torch.gather(scores, 1, order).cpu().numpy()
    return top_idx, top_scores


def _stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """topk, then order equal scores by image row (topk alone leaves tie order unspecified)."""
    vals, idx = torch.topk(scores, k, dim=1)
    # the k-th value may be shared with rows outside the top-k: fall back to a full stable sort
    kth = vals[:, -1:]
    if bool(((scores == kth).sum(1) > (vals == kth).sum(1)).any()):
        return torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    # order by (-score, row): sort by row, then stably by score
    order = torch.sort(idx, dim=1, stable=True).indices
    idx, vals = torch.gather(idx, 1, order), torch.gather(vals, 1, order)
    return torch.gather(idx, 1, torch.sort(-vals, dim=1, stable=True).indices)
