"""Voken vocabulary: the image codes of the RQ-VAE as new tokens of a seq2seq language model.

Token names per code position (fixed, so a saved model and its codes always agree):

* shared codebook: ``<v_{k}>`` at every one of the M levels (the same token may appear at any
  level; the position is implied by where it stands in the sequence);
* one codebook per level, or a shared codebook with ``level_tokens`` (one token range per level,
  the retriever's default): ``<v{d}_{k}>`` for level d (0-based) and entry k. With a shared
  codebook, ``<v{d}_{k}>`` of every level starts from the same vector (entry k), but each level
  gets its own rows, so a token says which level it stands at and the model never spends
  probability at one level on another level's vokens;
* disambiguation position (appended by ``generate_codes`` to make codes unique): ``<d_{k}>``.

The paper copies each voken's codebook vector into the new embedding row (Sec. 3.2, "we also copy
the voken's embedding into the vocabulary"). ``add_to`` does that when the codebook dim equals the
model dim; otherwise it maps the codebook with a fixed, seeded Gaussian random projection
``P ~ N(0, 1/d_model)`` of shape [latent_dim, d_model] (Johnson-Lindenstrauss: it keeps the
vokens' relative geometry, needs no fitting and is reproducible from the seed). Either way the
rows are then rescaled by one common factor so their mean L2 norm equals the mean row norm of
the model's existing embeddings: the relative norms among vokens are kept and the new rows sit
at the scale the network was trained on. Disambiguation tokens carry no visual meaning and the
``--no-voken-embedding`` ablation ignores the codebook: they get seeded Gaussian rows with the
same mean row norm.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import torch

from avg.core.io import InputError, read_json

VOCAB_FILE = "voken_vocab.json"
INIT_MODES = ("codebook", "random")


@dataclass
class VokenVocab:
    num_levels: int                      # M quantizer levels
    codebook_size: int                   # N entries per codebook
    shared_codebook: bool = True
    disambiguation: bool = False
    disambiguation_size: int = 0         # K, when a disambiguation position is appended
    level_tokens: bool = False           # shared codebook: one token range per level (<v{d}_{k}>)
    # code positions scored over their level's whole alphabet, not over the gallery's continuations
    # (the layout vokens of avg.models.layout with score="level"; avg.search.code_index "evidence levels")
    evidence_levels: list[int] = field(default_factory=list)
    # filled by add_to / bind: token ids per position, [L][size of that position's alphabet]
    position_token_ids: Optional[list[list[int]]] = field(default=None, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], source: str = "codes.json") -> "VokenVocab":
        """Build from the codes.json metadata (``num_levels``, ``codebook_size``, ...)."""
        try:
            vocab = cls(
                num_levels=int(meta["num_levels"]),
                codebook_size=int(meta["codebook_size"]),
                shared_codebook=bool(meta.get("shared_codebook", True)),
                disambiguation=bool(meta.get("disambiguation", False)),
                disambiguation_size=int(meta.get("disambiguation_size", 0) or 0),
                level_tokens=bool(meta.get("level_tokens", False)),
                evidence_levels=[int(d) for d in meta.get("evidence_levels") or []],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{source}: bad codes metadata ({e!r})") from None
        if vocab.num_levels < 1 or vocab.codebook_size < 1:
            raise InputError(f"{source}: num_levels and codebook_size must be positive")
        if vocab.disambiguation and vocab.disambiguation_size < 1:
            raise InputError(f"{source}: disambiguation is on but disambiguation_size={vocab.disambiguation_size}")
        if any(not 0 <= d < vocab.num_levels for d in vocab.evidence_levels) or \
                len(set(vocab.evidence_levels)) != len(vocab.evidence_levels):
            raise InputError(f"{source}: evidence_levels {vocab.evidence_levels} must be distinct levels in "
                             f"[0, {vocab.num_levels})")
        code_len = meta.get("code_len")
        if code_len is not None and int(code_len) != vocab.code_len:
            raise InputError(f"{source}: code_len={code_len} but num_levels={vocab.num_levels} and "
                             f"disambiguation={vocab.disambiguation} imply {vocab.code_len}")
        return vocab

    @classmethod
    def load(cls, directory: str | os.PathLike, tokenizer=None) -> "VokenVocab":
        """Read ``voken_vocab.json`` from a saved model dir; bind token ids when a tokenizer is given."""
        path = os.path.join(directory, VOCAB_FILE)
        meta = read_json(path)
        vocab = cls.from_meta(meta, source=path)
        if tokenizer is not None:
            vocab.bind(tokenizer)
        return vocab

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("position_token_ids")
        d["code_len"] = self.code_len
        d["tokens_per_position"] = [len(t) for t in self.position_tokens()]
        return d

    # ------------------------------------------------------------------ names
    @property
    def code_len(self) -> int:
        return self.num_levels + (1 if self.disambiguation else 0)

    def position_tokens(self) -> list[list[str]]:
        """Token strings allowed at each code position (index = code value)."""
        out = []
        for d in range(self.num_levels):
            if self.shared_codebook and not self.level_tokens:
                out.append([f"<v_{k}>" for k in range(self.codebook_size)])
            else:
                out.append([f"<v{d}_{k}>" for k in range(self.codebook_size)])
        if self.disambiguation:
            out.append([f"<d_{k}>" for k in range(self.disambiguation_size)])
        return out

    def tokens(self) -> list[str]:
        """All distinct voken token strings, in a fixed order."""
        seen, out = set(), []
        for toks in self.position_tokens():
            for t in toks:
                if t not in seen:
                    seen.add(t)
                    out.append(t)
        return out

    # ------------------------------------------------------------------ model surgery
    def add_to(self, tokenizer, model, codebook: Optional[np.ndarray] = None, *, init: str = "codebook",
               seed: int = 0) -> "VokenVocab":
        """Add the vokens to `tokenizer` and `model`, resize and initialise their embeddings.

        `codebook` is generate_codes/codebook.npy, float [n_books, N, latent_dim] (n_books = 1 when shared);
        `init="random"` (or no codebook) is the paper's no-voken-embedding ablation.
        """
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
        if init == "codebook" and codebook is None:
            raise ValueError("init='codebook' needs the codebook array (generate_codes/codebook.npy)")
        tokens = self.tokens()
        in_emb = model.get_input_embeddings()
        old_rows = in_emb.weight.shape[0]
        n_real = min(old_rows, len(tokenizer))  # T5 pads its matrix past the tokenizer: skip those rows
        existing = set(tokenizer.get_vocab())
        new_tokens = [t for t in tokens if t not in existing]
        tokenizer.add_tokens(new_tokens, special_tokens=True)
        self.bind(tokenizer)
        if len(tokenizer) > old_rows:  # never shrink: T5's matrix may already have spare rows
            model.resize_token_embeddings(max(len(tokenizer), old_rows), mean_resizing=False)
        gen = torch.Generator().manual_seed(int(seed))
        rows = self._init_rows(model.get_input_embeddings().weight, n_real, codebook, init, gen)
        out_emb = model.get_output_embeddings()
        tied = out_emb is None or out_emb.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        with torch.no_grad():
            self._write_rows(model.get_input_embeddings().weight, rows)
            if not tied:
                out_rows = self._init_rows(out_emb.weight, n_real, codebook, init, gen)
                self._write_rows(out_emb.weight, out_rows)
        model.config.vocab_size = model.get_input_embeddings().weight.shape[0]
        return self

    def bind(self, tokenizer) -> "VokenVocab":
        """Look up the token id of every voken (they must already be in the tokenizer)."""
        ids = []
        unk = getattr(tokenizer, "unk_token_id", None)
        for toks in self.position_tokens():
            pos_ids = tokenizer.convert_tokens_to_ids(toks)
            if any(i is None or (unk is not None and i == unk) for i in pos_ids):
                raise InputError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} lacks voken tokens "
                                 f"(e.g. {toks[0]}); was it saved after VokenVocab.add_to?")
            ids.append([int(i) for i in pos_ids])
        self.position_token_ids = ids
        self._lookup = None
        return self

    def _vectors(self, codebook: Optional[np.ndarray], init: str) -> list[Optional[np.ndarray]]:
        """Per distinct token (in tokens() order): its codebook vector, or None for a random row."""
        vecs: dict[str, Optional[np.ndarray]] = {}
        if init == "codebook":
            cb = np.asarray(codebook, dtype=np.float32)
            if cb.ndim == 2:
                cb = cb[None]
            n_books = 1 if self.shared_codebook else self.num_levels
            if cb.ndim != 3 or cb.shape[0] != n_books or cb.shape[1] != self.codebook_size:
                raise InputError(f"codebook has shape {tuple(np.shape(codebook))}, expected "
                                 f"[{n_books}, {self.codebook_size}, latent_dim]")
        for d, toks in enumerate(self.position_tokens()):
            for k, t in enumerate(toks):
                if t in vecs:
                    continue
                is_level = d < self.num_levels
                vecs[t] = cb[0 if self.shared_codebook else d, k] if (init == "codebook" and is_level) else None
        return [vecs[t] for t in self.tokens()]

    def _init_rows(self, weight: torch.Tensor, n_real: int, codebook, init: str,
                   gen: torch.Generator) -> torch.Tensor:
        d_model = weight.shape[1]
        target_norm = float(weight.detach()[:n_real].float().norm(dim=1).mean())
        vecs = self._vectors(codebook, init)
        rows = torch.randn(len(vecs), d_model, generator=gen)
        have = [i for i, v in enumerate(vecs) if v is not None]
        rand = [i for i, v in enumerate(vecs) if v is None]
        if rand:
            rows[rand] = rows[rand] * (target_norm / rows[rand].norm(dim=1).mean())
        if have:
            mapped = torch.from_numpy(np.stack([vecs[i] for i in have])).float()
            mapped = project_codebook(mapped, d_model, gen)
            mean_norm = mapped.norm(dim=1).mean().clamp_min(1e-12)
            rows[have] = mapped * (target_norm / mean_norm)
        return rows

    def _write_rows(self, weight: torch.Tensor, rows: torch.Tensor) -> None:
        ids = torch.tensor(self._token_ids_in_order(), dtype=torch.long)
        weight.data[ids.to(weight.device)] = rows.to(device=weight.device, dtype=weight.dtype)

    def _token_ids_in_order(self) -> list[int]:
        by_name = {}
        for toks, ids in zip(self.position_tokens(), self._require_ids()):
            by_name.update(zip(toks, ids))
        return [by_name[t] for t in self.tokens()]

    # ------------------------------------------------------------------ codes <-> ids
    def _require_ids(self) -> list[list[int]]:
        if self.position_token_ids is None:
            raise RuntimeError("VokenVocab has no token ids yet: call add_to(tokenizer, model) or bind(tokenizer)")
        return self.position_token_ids

    def position_id_tensor(self, position: int) -> torch.Tensor:
        """LongTensor of the token ids allowed at `position` (index = code value)."""
        return torch.tensor(self._require_ids()[position], dtype=torch.long)

    @property
    def voken_ids(self) -> torch.Tensor:
        """All distinct voken token ids (sorted)."""
        return torch.tensor(sorted({i for ids in self._require_ids() for i in ids}), dtype=torch.long)

    def _tables(self):
        if getattr(self, "_lookup", None) is None:
            ids = self._require_ids()
            width = max(len(p) for p in ids)
            fwd = torch.full((len(ids), width), -1, dtype=torch.long)
            for d, p in enumerate(ids):
                fwd[d, : len(p)] = torch.tensor(p)
            size = int(fwd.max()) + 1
            inv = torch.full((len(ids), size), -1, dtype=torch.long)
            for d, p in enumerate(ids):
                inv[d, torch.tensor(p)] = torch.arange(len(p))
            self._lookup = (fwd, inv)
        return self._lookup

    def code_to_token_ids(self, codes) -> torch.Tensor:
        """Codes [..., L] (ints) -> token ids [..., L]; raises on a value outside a position's alphabet."""
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
        fwd, _ = self._tables()
        if codes.shape[-1] != self.code_len:
            raise ValueError(f"codes have length {codes.shape[-1]}, vocabulary expects {self.code_len}")
        sizes = torch.tensor([len(p) for p in self._require_ids()])
        if bool(((codes < 0) | (codes >= sizes)).any()):
            raise ValueError(f"code values out of range for alphabet sizes {sizes.tolist()}")
        pos = torch.arange(self.code_len).expand_as(codes)
        return fwd[pos, codes]

    def token_ids_to_codes(self, ids) -> torch.Tensor:
        """Token ids [..., L] -> codes [..., L]; -1 where a token is not a voken of that position."""
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        _, inv = self._tables()
        if ids.shape[-1] != self.code_len:
            raise ValueError(f"sequences have length {ids.shape[-1]}, vocabulary expects {self.code_len}")
        pos = torch.arange(self.code_len).expand_as(ids)
        ok = (ids >= 0) & (ids < inv.shape[1])
        out = torch.full_like(ids, -1)
        out[ok] = inv[pos[ok], ids[ok]]
        return out


def project_codebook(vectors: torch.Tensor, d_model: int, gen: torch.Generator) -> torch.Tensor:
    """Map [n, latent_dim] codebook vectors to d_model: identity when dims match, else a seeded
    Gaussian random projection with entries N(0, 1/d_model) (see the module docstring)."""
    latent = vectors.shape[1]
    if latent == d_model:
        return vectors.clone()
    proj = torch.randn(latent, d_model, generator=gen) / d_model ** 0.5
    return vectors @ proj


__all__ = ["VokenVocab", "VOCAB_FILE", "project_codebook"]
