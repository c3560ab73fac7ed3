"""A split's gallery: image ids and their codes, and the map from a generated code to images.

Retrieval is scored per image (DESIGN.md, "Protocol and honesty rules"). With unique codes
(``generate_codes --disambiguation global`` appends a disambiguation position) a generated code is one
image. When codes collide (the default: raw codes) a generated code stands for every image that shares it; they are listed one after another, each at its own rank, in a fixed order: the images
sorted by id, then permuted by ``numpy.random.default_rng([seed, *code])``. The order is random
(so no image is favoured by its name) yet reproducible, and a query whose gold image shares its
code with two others lands at rank 1, 2 or 3 -- never "all three at rank 1".
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from avg.core.io import InputError, read_json


class Gallery:
    def __init__(self, image_ids: Sequence[str], codes, *, seed: int = 0, name: str = "gallery"):
        self.name = name
        self.seed = int(seed)
        self.image_ids = [str(i) for i in image_ids]
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[0] != len(self.image_ids):
            raise InputError(f"{name}: expected codes [{len(self.image_ids)}, L], got shape {codes.shape}")
        if len(set(self.image_ids)) != len(self.image_ids):
            raise InputError(f"{name}: duplicate image ids")
        self.codes = codes
        groups: dict[tuple, list[str]] = {}
        for image_id, code in zip(self.image_ids, codes.tolist()):
            groups.setdefault(tuple(code), []).append(image_id)
        self._members: dict[tuple, list[str]] = {}
        for code, members in groups.items():
            members = sorted(members)
            if len(members) > 1:
                rng = np.random.default_rng([self.seed, *code])
                members = [members[i] for i in rng.permutation(len(members))]
            self._members[code] = members
        self.unique_codes = np.array(list(self._members), dtype=np.int64).reshape(len(self._members), codes.shape[1])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Sequence[int]], *, seed: int = 0, name: str = "gallery") -> "Gallery":
        ids = list(mapping)
        codes = [list(mapping[i]) for i in ids]
        lens = {len(c) for c in codes}
        if len(lens) > 1:
            raise InputError(f"{name}: codes of different lengths {sorted(lens)}")
        return cls(ids, np.array(codes, dtype=np.int64).reshape(len(ids), lens.pop() if lens else 0),
                   seed=seed, name=name)

    @classmethod
    def load(cls, path: str | os.PathLike, *, seed: int = 0) -> "Gallery":
        """Read ``gallery_{split}.json`` ({image_id: code}) written by prepare_dataset."""
        data = read_json(path)
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected an object {{image_id: code}}")
        for image_id, code in data.items():
            if not isinstance(code, list) or not all(isinstance(c, int) and c >= 0 for c in code):
                raise InputError(f"{path}: image {image_id!r}: code must be a list of non-negative ints, got {code!r}")
        return cls.from_mapping(data, seed=seed, name=str(path))

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def code_len(self) -> int:
        return int(self.codes.shape[1])

    @property
    def num_colliding_images(self) -> int:
        """Images that share their code with at least one other image."""
        return sum(len(m) for m in self._members.values() if len(m) > 1)

    def images_for(self, code: Sequence[int]) -> list[str]:
        """Images whose code is `code`, in the documented seeded order ([] if none)."""
        return list(self._members.get(tuple(int(c) for c in code), ()))

    def code_of(self) -> dict[str, tuple]:
        return {i: tuple(c) for i, c in zip(self.image_ids, self.codes.tolist())}

    def rank(self, codes, scores) -> tuple[list[str], list[float]]:
        """Generated codes [K, L] (best first) + their scores -> ranked image ids and scores.

        Codes that map to no image (-1 entries, or not in the gallery) are dropped; each image
        appears once, at its own rank; images that share a code share its score.
        """
        ranked, ranked_scores, seen = [], [], set()
        for code, score in zip(np.asarray(codes).tolist(), np.asarray(scores, dtype=np.float64).tolist()):
            for image_id in self._members.get(tuple(code), ()):
                if image_id not in seen:
                    seen.add(image_id)
                    ranked.append(image_id)
                    ranked_scores.append(float(score))
        return ranked, ranked_scores

    def subset(self, rows, name: Optional[str] = None) -> "Gallery":
        """The gallery of the images at positions ``rows`` (same tie seed)."""
        rows = np.asarray(rows, dtype=np.int64)
        return Gallery([self.image_ids[i] for i in rows], self.codes[rows], seed=self.seed, name=name or f"{self.name}[subset]")

    def chunks(self, size: int, seed: int) -> list["Gallery"]:
        """The images in a seeded order, cut into galleries of ``size`` images (a last chunk smaller
        than half of ``size`` is merged into the one before); ``[self]`` when ``size`` is 0 or at
        least the gallery. Used to search training queries among as many images as an evaluation
        gallery holds (stage-2 candidates, reranker training lists, the train-fit diagnostic)."""
        if size <= 0 or size >= len(self):
            return [self]
        order = np.random.default_rng([seed, 99]).permutation(len(self))
        cuts = [order[i:i + size] for i in range(0, len(order), size)]
        if len(cuts) > 1 and len(cuts[-1]) < size // 2:
            last = cuts.pop()  # (popped first: in `a[-2] = f(a.pop())` the target is taken after the pop)
            cuts[-1] = np.concatenate([cuts[-1], last])
        return [self.subset(c, name=f"{self.name}[chunk {j}]") for j, c in enumerate(cuts)]

    # ------------------------------------------------------------------ search index
    def token_codes(self, vocab) -> torch.Tensor:
        """The distinct codes as voken token ids, LongTensor [U, L] (the constraint's allowed set); a
        gallery whose codes the vocabulary cannot spell is an InputError naming the gallery."""
        try:
            return vocab.code_to_token_ids(self.unique_codes)
        except ValueError as e:
            raise InputError(f"{self.name}: {e}: a gallery of other codes than the retriever's vokens") from None

    def build_index(self, vocab, vocab_size: int, device: Optional[torch.device] = None):
        """CodeIndex over the unique codes, for avg.search.beam.constrained_beam_search (with the
        vocabulary's ``evidence_levels`` as its evidence depths)."""
        from avg.search.code_index import CodeIndex

        return CodeIndex.from_codes(self.token_codes(vocab), vocab_size, device=device,
                                    evidence_depths=getattr(vocab, "evidence_levels", ()))


__all__ = ["Gallery"]
