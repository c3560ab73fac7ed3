"""k-means initialisation of the RQ-VAE codebooks and dead-code re-initialisation.

A randomly initialised codebook leaves most vokens unused (codebook collapse), which shows up
later as colliding image codes. Initialising every codebook with k-means over the encoder's
latents -- and resetting codes nobody picked for a while to current residuals -- keeps the
codebook in use.

Choice of data for each codebook:
- per-level books: level d is fitted to the residuals r_d left after quantizing levels < d with
  the already fitted books (the data that level actually sees);
- shared book (the paper's setting), ``shared_init="levels"`` (default): the N entries are split
  into M slices; slice d is fitted (k = N/M) to the residuals left after quantizing with the
  slices fitted so far. ``shared_init="latents"`` fits all N entries to the level-1 latents
  z = r_1 instead. That simpler choice leaves no entry near the small later-level residuals:
  right after init on a synthetic set (300 clustered images, untrained encoder), every level
  >= 2 used ONE entry; collision rates latents/levels/per-level books: N=16,M=3: 95%/66%/4%;
  N=32,M=3: 72%/8%/0%; N=64,M=4: 16%/0%/0%.
  Levels >= 2 in a shared book all draw from the same N entries, so a later level can still
  pick any voken; the slices only decide where the entries start.
Dead-code resets draw from the residuals of the book's level (all levels pooled for a shared
book).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(-1, keepdim=True) - 2.0 * x @ c.t() + c.pow(2).sum(-1)[None, :]).clamp_min_(0.0)


@torch.no_grad()
def assign(x: torch.Tensor, centroids: torch.Tensor, batch_size: int = 65536):
    """Nearest centroid of each row and its squared distance, in batches of ``batch_size`` rows."""
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], batch_size):
        d = _sq_dists(x[s : s + batch_size], centroids)
        dists[s : s + batch_size], labels[s : s + batch_size] = d.min(-1)
    return labels, dists


@torch.no_grad()
def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator, batch_size: int = 65536) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling); O(n k d), batched."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    d2 = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    for _ in range(1, k):
        last = centroids[-1][None, :]
        for s in range(0, n, batch_size):
            d2[s : s + batch_size] = torch.minimum(d2[s : s + batch_size], _sq_dists(x[s : s + batch_size], last)[:, 0])
        total = float(d2.sum())
        if total > 0:
            idx = int(torch.multinomial((d2 / total).cpu(), 1, generator=generator))
        else:  # every point coincides with a centroid already
            idx = int(torch.randint(n, (1,), generator=generator))
        centroids.append(x[idx])
    return torch.stack(centroids)


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [k, d]
    labels: torch.Tensor  # [n]
    inertia: float  # sum of squared distances to the assigned centroid
    iterations: int


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 25,
    init: str = "k-means++",
    seed: int = 0,
    batch_size: int = 65536,
    init_centroids: Optional[torch.Tensor] = None,
) -> KMeansResult:
    """Lloyd's algorithm. An empty cluster keeps its previous centroid. Stops early when no
    assignment changes. With fewer points than ``k``, the extra centroids are copies of random
    points plus tiny seeded noise (they start dead and are left to dead-code resets)."""
    x = x.float()
    n = x.shape[0]
    if n == 0:
        raise ValueError("kmeans: no data")
    g = torch.Generator().manual_seed(seed)
    if init_centroids is not None:
        c = init_centroids.float().clone().to(x.device)
    elif n <= k:
        extra = x[torch.randint(n, (k - n,), generator=g)] if k > n else x[:0]
        noise = torch.randn(extra.shape, generator=g).to(x.device) * (1e-3 * (float(x.std()) if n > 1 else 1.0) + 1e-6)
        c = torch.cat([x, extra + noise])
    elif init == "k-means++":
        c = kmeans_plusplus(x, k, g, batch_size)
    elif init == "random":
        c = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    else:
        raise ValueError(f"kmeans: unknown init {init!r} (k-means++ or random)")
    labels, dists = assign(x, c, batch_size)
    it = 0
    for it in range(1, iters + 1):
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, torch.ones_like(dists))
        nonempty = counts > 0
        c = torch.where(nonempty[:, None], sums / counts.clamp_min(1)[:, None], c)
        new_labels, dists = assign(x, c, batch_size)
        changed = bool((new_labels != labels).any())
        labels = new_labels
        if not changed:
            break
    return KMeansResult(c, labels, float(dists.sum()), it)


@torch.no_grad()
def init_codebooks(
    model,
    features: torch.Tensor,
    *,
    seed: int = 0,
    iters: int = 25,
    init: str = "k-means++",
    batch_size: int = 65536,
    shared_init: str = "levels",
) -> list[float]:
    """Fit ``model``'s codebook(s) by k-means on the encoder outputs of ``features`` (a sample of
    training image vectors, float32); ``shared_init`` picks the data for a shared book (module
    docstring). Returns the k-means inertia of each book."""
    if shared_init not in ("levels", "latents"):
        raise ValueError(f"init_codebooks: shared_init must be 'levels' or 'latents', got {shared_init!r}")
    cfg = model.config
    was_training = model.training
    model.eval()
    z = torch.cat([model.encoder(features[s : s + batch_size]) for s in range(0, features.shape[0], batch_size)])
    model.train(was_training)
    inertias = []
    if cfg.shared_codebook and shared_init == "latents":
        res = kmeans(z, cfg.codebook_size, iters=iters, init=init, seed=seed, batch_size=batch_size)
        model.set_codebook(0, res.centroids)
        inertias.append(res.inertia)
    elif cfg.shared_codebook:  # "levels": slice d of the book fitted to the residuals of level d
        m, n = cfg.num_levels, cfg.codebook_size
        sizes = [n // m + (1 if d < n % m else 0) for d in range(m)]
        parts: list[torch.Tensor] = []
        r, total = z, 0.0
        for level, size in enumerate(sizes):
            if size == 0:
                break
            res = kmeans(r, size, iters=iters, init=init, seed=seed + level, batch_size=batch_size)
            parts.append(res.centroids)
            total += res.inertia
            book = torch.cat(parts)
            r = r - book[assign(r, book, batch_size)[0]]  # quantize with the whole book so far
        model.set_codebook(0, torch.cat(parts))
        inertias.append(total)
    else:
        r = z
        for level in range(cfg.num_levels):
            res = kmeans(r, cfg.codebook_size, iters=iters, init=init, seed=seed + level, batch_size=batch_size)
            model.set_codebook(level, res.centroids)
            inertias.append(res.inertia)
            r = r - res.centroids[res.labels]
    return inertias


class DeadCodeTracker:
    """Counts, per codebook entry, the optimizer steps since it was last picked; entries unused for
    ``threshold`` steps are reset to random residuals of the current batch (0 disables).

    In a multi-process run, feed it gathered generate_codes/residuals so every process resets alike."""

    def __init__(self, num_books: int, codebook_size: int, num_levels: int, threshold: int, seed: int = 0) -> None:
        self.threshold = int(threshold)
        self.num_levels = num_levels
        self.unused = torch.zeros(num_books, codebook_size, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)
        self.total_reset = 0

    def _book(self, level: int) -> int:
        return 0 if self.unused.shape[0] == 1 else level

    def update(self, codes: torch.Tensor) -> None:
        codes = codes.detach().cpu()
        used = torch.zeros_like(self.unused, dtype=torch.bool)
        for level in range(codes.shape[1]):
            used[self._book(level), codes[:, level]] = True
        self.unused += 1
        self.unused[used] = 0

    def dead_mask(self) -> torch.Tensor:
        if self.threshold <= 0:
            return torch.zeros_like(self.unused, dtype=torch.bool)
        return self.unused >= self.threshold

    @torch.no_grad()
    def reset(self, model, residuals: torch.Tensor) -> int:
        """Reset dead entries of ``model``'s codebooks to random rows of ``residuals`` [B, M, D]
        (the level's residuals; all levels pooled for a shared book). Returns how many."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        residuals = residuals.detach()
        for b in range(self.unused.shape[0]):
            rows = dead[b].nonzero().flatten()
            if rows.numel() == 0:
                continue
            pool = residuals.reshape(-1, residuals.shape[-1]) if self.unused.shape[0] == 1 else residuals[:, b]
            pick = torch.randint(pool.shape[0], (rows.numel(),), generator=self.generator)
            model.set_codebook(b, pool[pick.to(pool.device)], rows=rows.to(pool.device))
            self.unused[b, rows] = 0
        self.total_reset += n_dead
        return n_dead

    def state_dict(self) -> dict:
        """Plain lists and numbers (JSON-able: the trainer checkpoints it with its counters)."""
        return {"unused": self.unused.tolist(), "generator": self.generator.get_state().tolist(),
                "total_reset": self.total_reset, "threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        unused = torch.as_tensor(state["unused"], dtype=self.unused.dtype)
        if unused.shape != self.unused.shape:
            raise ValueError(f"dead-code state of shape {tuple(unused.shape)}, the codebooks need {tuple(self.unused.shape)}")
        self.unused.copy_(unused)
        self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))
        self.total_reset = int(state["total_reset"])
