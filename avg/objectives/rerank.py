"""Reranker losses over a batch of candidate lists (scores [B, K], -inf where a list is shorter).

* listwise: softmax cross-entropy of the list's scores (divided by a temperature) against the
  positive's position -- the same form as the retriever's discriminative loss (eq. 9), here over
  the reranker's scores of the retriever's top-k;
* pointwise (optional): binary cross-entropy of every (query, candidate) score, positive = 1.

Lists without the positive (label -1; only possible in evaluation lists) are left out of both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def listwise_loss(scores: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over lists with a positive of ``-log softmax(scores / T)[positive]``."""
    keep = labels >= 0
    if not bool(keep.any()):
        return scores.new_zeros(())
    return F.cross_entropy(scores[keep].float() / temperature, labels[keep])


def pointwise_loss(scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the valid (query, candidate) pairs of lists with a positive."""
    keep = (labels >= 0)[:, None] & valid
    if not bool(keep.any()):
        return scores.new_zeros(())
    target = torch.zeros_like(scores, dtype=torch.float32)
    rows = torch.nonzero(labels >= 0).squeeze(1)
    target[rows, labels[rows]] = 1.0
    return F.binary_cross_entropy_with_logits(scores.float()[keep], target[keep])


__all__ = ["listwise_loss", "pointwise_loss"]
