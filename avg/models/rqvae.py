"""RQ-VAE image tokenizer with cross-modal semantic alignment (AVG paper, Sec. 3.1, eqs. 2-6).

An MLP encoder maps a frozen CLIP image vector ``v_i`` to a latent ``z``; M residual quantization
steps pick M vokens from a visual codebook; an MLP decoder maps the quantized latent back to the
CLIP space, where it is pulled towards both the image vector (reconstruction) and a caption's
text vector (alignment). The M voken ids are the image's identifier for generative retrieval.

Loss reduction: every term is the *mean over the batch of squared L2 norms* (sum over feature
dimensions, mean over rows), so a term's scale does not depend on the batch size and the weights
of eq. 6 keep their meaning across batch sizes.

Commitment loss: eq. 4 writes ``||v_i - sg(z_d)||^2``, but the partial sums ``z_d`` live in the
encoder's latent space (``latent_dim``), not in CLIP space, so -- as in Lee et al. 2022 (RQ-VAE),
which AVG builds on -- the commitment term uses the encoder output ``z`` in place of ``v_i``.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from avg.core.io import InputError, read_json

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_TYPE = "avg-rqvae"


@dataclass
class RQVAEConfig:
    """Hyper-parameters of the tokenizer. ``shared_codebook=True`` is the paper's setting (one
    codebook C used at every quantization step); False gives one codebook per level."""

    input_dim: int = 768
    hidden_dims: Sequence[int] = (512, 256)
    latent_dim: int = 64
    num_levels: int = 4
    codebook_size: int = 256
    shared_codebook: bool = True
    activation: str = "gelu"
    dropout: float = 0.0
    recon_weight: float = 1.0
    commit_weight: float = 0.25
    codebook_weight: float = 1.0
    align_weight: float = 1.0
    # "loss": codebook learned by the codebook term sum_d ||sg(r_d) - e_{code_d}||^2;
    # "ema": exponential moving averages of the assigned residuals (no codebook gradient).
    codebook_update: str = "loss"
    ema_decay: float = 0.99
    ema_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.hidden_dims = [int(h) for h in self.hidden_dims]
        if self.input_dim <= 0 or self.latent_dim <= 0:
            raise ValueError("RQVAEConfig: input_dim and latent_dim must be positive")
        if self.num_levels < 1 or self.codebook_size < 1:
            raise ValueError("RQVAEConfig: num_levels and codebook_size must be >= 1")
        if self.codebook_update not in ("loss", "ema"):
            raise ValueError(f"RQVAEConfig: codebook_update must be 'loss' or 'ema', got {self.codebook_update!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"RQVAEConfig: activation must be one of {sorted(_ACTIVATIONS)}")

    @property
    def num_books(self) -> int:
        return 1 if self.shared_codebook else self.num_levels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RQVAEConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _mlp(dims: Sequence[int], activation: str, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def sq_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared L2 norm of ``a - b`` (the reduction of every loss)."""
    return (a - b).pow(2).sum(-1).mean()


def nearest_code(r: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """argmin_k ||r - E_k||^2 for each row, vectorised as ||r||^2 - 2 r.E^T + ||E||^2."""
    d = r.pow(2).sum(-1, keepdim=True) - 2.0 * r @ book.t() + book.pow(2).sum(-1)[None, :]
    return d.argmin(-1)


@dataclass
class RQVAEOutput:
    codes: torch.Tensor  # [B, M] voken ids
    z: torch.Tensor  # [B, latent] encoder output
    residuals: torch.Tensor  # [B, M, latent] r_1..r_M (r_1 = z), detached
    partial_sums: torch.Tensor  # [B, M, latent] z^(1)..z^(M)
    decoded: torch.Tensor  # [B, input_dim] MLP(z^(M)) through the straight-through estimator
    recon_loss: torch.Tensor
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor
    align_loss: Optional[torch.Tensor]
    loss: torch.Tensor  # eq. 6 (weighted), plus the weighted codebook term
    losses: dict = field(default_factory=dict)


class RQVAE(nn.Module):
    """MLP encoder -> M residual quantization steps over a (shared or per-level) codebook ->
    MLP decoder. Free of I/O except ``save_pretrained``/``from_pretrained``."""

    def __init__(self, config: RQVAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.encoder = _mlp([c.input_dim, *c.hidden_dims, c.latent_dim], c.activation, c.dropout)
        self.decoder = _mlp([c.latent_dim, *reversed(c.hidden_dims), c.input_dim], c.activation, c.dropout)
        # C: randomly initialised (paper); k-means initialisation is done by the trainer.
        books = torch.randn(c.num_books, c.codebook_size, c.latent_dim) / c.latent_dim**0.5
        self.codebooks = nn.Parameter(books, requires_grad=c.codebook_update == "loss")
        if c.codebook_update == "ema":
            self.register_buffer("ema_count", torch.ones(c.num_books, c.codebook_size))
            self.register_buffer("ema_sum", books.clone())

    # -- codebook accessors -------------------------------------------------------------
    def codebook(self, level: int) -> torch.Tensor:
        """The codebook used at quantization step ``level`` (0-based)."""
        if not 0 <= level < self.config.num_levels:
            raise IndexError(f"level {level} outside 0..{self.config.num_levels - 1}")
        return self.codebooks[0 if self.config.shared_codebook else level]

    def book_index(self, level: int) -> int:
        return 0 if self.config.shared_codebook else level

    @torch.no_grad()
    def set_codebook(self, book: int, vectors: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        """Overwrite codebook ``book`` (all rows, or ``rows``) -- k-means init, dead-code reset."""
        target = self.codebooks.data[book]
        if rows is None:
            target.copy_(vectors)
        else:
            target[rows] = vectors.to(target.dtype)
        if self.config.codebook_update == "ema":
            if rows is None:
                self.ema_sum[book].copy_(vectors)
                self.ema_count[book].fill_(1.0)
            else:
                self.ema_sum[book][rows] = vectors.to(target.dtype)
                self.ema_count[book][rows] = 1.0

    # -- quantization -------------------------------------------------------------------
    def quantize(self, z: torch.Tensor):
        """Residual quantization, eq. 2: r_1 = z, code_j = argmin ||r_j - e||, r_{j+1} = r_j - e.

        Returns codes [B, M], residuals [B, M, D] (detached) and the picked voken vectors
        [B, M, D] (differentiable w.r.t. the codebook, for the codebook loss)."""
        r = z.detach()
        codes, residuals, vokens = [], [], []
        for level in range(self.config.num_levels):
            book = self.codebook(level)
            with torch.no_grad():
                code = nearest_code(r, book)
            e = book[code]
            codes.append(code)
            residuals.append(r)
            vokens.append(e)
            r = r - e.detach()
        return torch.stack(codes, 1), torch.stack(residuals, 1), torch.stack(vokens, 1)

    def forward(
        self,
        x: torch.Tensor,
        text: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
    ) -> RQVAEOutput:
        """``x``: image vectors [B, input_dim]; ``text``: one caption vector per image (optional,
        for the alignment loss); ``text_mask``: bool [B], False for images without a caption."""
        c = self.config
        z = self.encoder(x)
        codes, residuals, vokens = self.quantize(z)
        partial_sums = vokens.cumsum(1)  # z^(d) = sum_{j<=d} voken_j
        z_q = z + (partial_sums[:, -1] - z).detach()  # straight-through estimator
        decoded = self.decoder(z_q)
        recon = sq_l2(decoded, x)  # eq. 3
        # eq. 4 with z in place of v_i (see module docstring)
        commit = sum(sq_l2(z, partial_sums[:, d].detach()) for d in range(c.num_levels))
        if c.codebook_update == "loss":
            codebook = sum(sq_l2(vokens[:, d], residuals[:, d]) for d in range(c.num_levels))
        else:
            codebook = z.new_zeros(())
            if self.training:
                self._ema_update(codes, residuals)
        align = None
        if text is not None:  # eq. 5
            per_row = (decoded - text).pow(2).sum(-1)
            if text_mask is not None:
                m = text_mask.to(per_row.dtype)
                align = (per_row * m).sum() / m.sum().clamp_min(1.0)
            else:
                align = per_row.mean()
        loss = c.recon_weight * recon + c.commit_weight * commit + c.codebook_weight * codebook  # eq. 6
        if align is not None:
            loss = loss + c.align_weight * align
        losses = {"recon": recon.detach(), "commit": commit.detach(), "codebook": codebook.detach()}
        if align is not None:
            losses["align"] = align.detach()
        losses["total"] = loss.detach()
        return RQVAEOutput(codes, z, residuals, partial_sums, decoded, recon, commit, codebook, align, loss, losses)

    @torch.no_grad()
    def _ema_update(self, codes: torch.Tensor, residuals: torch.Tensor) -> None:
        """EMA codebook update (VQ-VAE-2 style) from the residuals assigned to each code; with a
        shared book the statistics of every level are pooled. Synced across processes."""
        c = self.config
        counts = torch.zeros_like(self.ema_count)
        sums = torch.zeros_like(self.ema_sum)
        for level in range(c.num_levels):
            b = self.book_index(level)
            counts[b].index_add_(0, codes[:, level], torch.ones_like(codes[:, level], dtype=counts.dtype))
            sums[b].index_add_(0, codes[:, level], residuals[:, level].to(sums.dtype))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.ema_count.mul_(c.ema_decay).add_(counts, alpha=1 - c.ema_decay)
        self.ema_sum.mul_(c.ema_decay).add_(sums, alpha=1 - c.ema_decay)
        n = self.ema_count.sum(-1, keepdim=True)
        smoothed = (self.ema_count + c.ema_eps) / (n + c.codebook_size * c.ema_eps) * n  # Laplace
        self.codebooks.data.copy_(self.ema_sum / smoothed.unsqueeze(-1))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Voken ids [B, M] of image vectors (no gradient; for code generation)."""
        return self.quantize(self.encoder(x))[0]

    @torch.no_grad()
    def encode_with_error(self, x: torch.Tensor):
        """Voken ids [B, M] and the quantization error ||z - z^(M)|| [B] (collision tie rule)."""
        z = self.encoder(x)
        codes, _, vokens = self.quantize(z)
        return codes, (z - vokens.sum(1)).norm(dim=-1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """MLP(z^(M)) of voken ids [B, M]: what a code alone says about the image, in CLIP space
        (the tokenizer's retrieval ceiling is measured on it)."""
        codes = torch.as_tensor(codes, device=self.codebooks.device).long()
        if codes.dim() != 2 or codes.shape[1] != self.config.num_levels:
            raise ValueError(f"codes must be [batch, {self.config.num_levels}], got {tuple(codes.shape)}")
        z_q = sum(self.codebook(level)[codes[:, level]] for level in range(self.config.num_levels))
        return self.decoder(z_q)

    # -- persistence --------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` + ``config.json`` into ``out_dir`` (each file atomically)."""
        from safetensors.torch import save_file

        from avg.core.io import atomic_path, write_json

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        write_json({"model_type": MODEL_TYPE, **self.config.to_dict()}, out_dir / CONFIG_NAME)
        return out_dir

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, map_location: str = "cpu") -> "RQVAE":
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        cfg = read_json(model_dir / CONFIG_NAME)
        if cfg.get("model_type") != MODEL_TYPE:
            raise InputError(f"{model_dir / CONFIG_NAME}: not an RQ-VAE config (model_type={cfg.get('model_type')!r})")
        weights = model_dir / WEIGHTS_NAME
        if not weights.is_file():
            raise InputError(f"{weights}: file not found (train the tokenizer first: scripts/train_rqvae.sh)")
        try:
            config = RQVAEConfig.from_dict(cfg)
        except (TypeError, ValueError) as e:
            raise InputError(f"{model_dir / CONFIG_NAME}: invalid RQ-VAE config ({e})") from None
        model = cls(config)
        try:
            model.load_state_dict(load_file(str(weights), device=map_location))
        except Exception as e:  # safetensors header errors, shape/key mismatches
            raise InputError(f"{weights}: unreadable or does not match {model_dir / CONFIG_NAME} ({e})") from None
        model.eval()
        return model
