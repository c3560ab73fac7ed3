"""The reranker's scoring heads: an MLP over the LM state (and CLIP features), and the grid head that
reads a candidate's layout (avg.reranker.model's docstring says what each sees)."""
from __future__ import annotations

import torch
import torch.nn as nn


class ScoreHead(nn.Module):
    def __init__(self, hidden_size: int, *, inner: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)


class GridHead(nn.Module):
    """Query slots x image grid cells (module docstring): [P, S, d] slots and [P, cells, W] grids ->
    [P] scores. The last layer starts at zero, so an untrained grid head adds nothing."""

    def __init__(self, hidden_size: int, grid_width: int, cells: int, *, slots: int = 8, width: int = 256):
        super().__init__()
        heads = 4 if width % 4 == 0 else 1
        self.text = nn.Linear(hidden_size, width)
        self.slots = nn.Parameter(torch.randn(1, slots, width) * 0.02)
        self.summarise_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.image = nn.Sequential(nn.LayerNorm(grid_width), nn.Linear(grid_width, width))
        self.position = nn.Parameter(torch.randn(cells, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attend = nn.MultiheadAttention(width, heads, batch_first=True)
        self.score = nn.Sequential(nn.Linear(3 * width, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.zeros_(self.score[-1].weight)
        nn.init.zeros_(self.score[-1].bias)

    def shape(self) -> dict:
        """The sizes that rebuild it (saved in reranker.json)."""
        return {"grid_slots": int(self.slots.shape[1]), "grid_cells": int(self.position.shape[0]),
                "grid_width": int(self.image[0].normalized_shape[0])}

    def summarise(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, T, H] query token states, [B, T] attention mask -> [B, S, width] slots (once per query)."""
        keys = self.text(states.to(self.text.weight.dtype))
        slots = self.slots.expand(states.shape[0], -1, -1)
        out, _ = self.summarise_attn(slots, keys, keys, key_padding_mask=~mask.bool(), need_weights=False)
        return out

    def forward(self, slots: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if grid.shape[1] != self.position.shape[0]:
            raise ValueError(f"the grid head was built for {self.position.shape[0]} cells, the features have {grid.shape[1]}")
        cells = self.image(grid.to(self.position.dtype)) + self.position
        found, _ = self.attend(self.norm(slots), cells, cells, need_weights=False)
        return self.score(torch.cat([slots, found, slots * found], dim=-1)).squeeze(-1).mean(1).float()


__all__ = ["ScoreHead", "GridHead"]
