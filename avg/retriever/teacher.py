"""A CLIP teacher for the retriever's losses (``--gen-teacher-mix``, ``--dis-teacher-mix``; off in
the paper's setting).

:class:`GalleryTeacher` scores every image of the training gallery for a batch of queries
(``scale * cos``): :func:`avg.objectives.retrieval.distilled_code_loss` turns those scores into a soft
target for each position of the code -- how much of the teacher's mass lies under each voken that
may follow the gold prefix -- mixed with the one-hot gold voken of eq. 7.

The paper's L_dis (eq. 9) is a cross-entropy towards the one positive image of each list. On data
whose captions fit many images, the other candidates of a list are often as good a match as the
positive, and a one-hot target pushes them down all the same. The two-tower that made the
features grades them: ``cos(text feature, image feature)`` of each candidate. :class:`CodeTeacher`
scores a list of candidate codes for a query with it -- a code stands for the images of the
chunk that carry it, scored by the best of them -- and :func:`avg.objectives.retrieval.teacher_targets`
mixes its softmax with the one-hot target.

No I/O: built from arrays (the prepare_emb/ image features, the chunks' galleries, the vocabulary).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from avg.core.io import InputError


def _check_rows(gallery, image_rows: Mapping[str, int]) -> None:
    """Every image of ``gallery`` has a row in prepare_emb/ (an InputError naming the gallery and the image)."""
    missing = [i for i in gallery.image_ids if i not in image_rows]
    if missing:
        raise InputError(f"{gallery.name}: image {missing[0]!r} (and {len(missing) - 1} more) has no row in "
                         "prepare_emb/image_features.npy: prepare_retriever_dataset/ and prepare_emb/ come from different runs")


class CodeTeacher:
    """Per gallery chunk: token-id code -> the prepare_emb/ rows of the images that carry it.

    ``image_features`` [N, D] (rows of prepare_emb/image_features.npy), ``image_rows`` {image_id: row},
    ``chunks``: the stage-2 galleries (:class:`~avg.search.gallery.Gallery`), ``vocab`` maps
    their codes to token ids (what the search returns).
    """

    def __init__(self, image_features, image_rows: Mapping[str, int], chunks: Sequence, vocab):
        self._codes: list[dict[tuple, int]] = []
        self._members: list[torch.Tensor] = []  # per chunk [U, max members] rows of self.features, -1 padded
        used: dict[int, int] = {}  # prepare_emb/ row -> row of self.features (only the chunks' images are kept)
        for chunk in chunks:
            _check_rows(chunk, image_rows)
            tokens = vocab.code_to_token_ids(chunk.unique_codes).tolist()
            groups = [[used.setdefault(image_rows[i], len(used)) for i in chunk.images_for(code)]
                      for code in chunk.unique_codes.tolist()]
            width = max(len(g) for g in groups)
            table = torch.full((len(groups), width), -1, dtype=torch.long)
            for u, g in enumerate(groups):
                table[u, : len(g)] = torch.tensor(g, dtype=torch.long)
            self._codes.append({tuple(t): u for u, t in enumerate(tokens)})
            self._members.append(table)
        feats = np.array(image_features[np.array(list(used), dtype=np.int64)], dtype=np.float32)
        self.features = torch.nn.functional.normalize(torch.from_numpy(feats), dim=-1)

    def scores(self, chunk: int, candidates: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor:
        """candidates [B, b, L] (token ids of codes of chunk ``chunk``), query_features [B, D]
        -> [B, b] float: the largest cosine between the query and an image of each code."""
        B, b, L = candidates.shape
        lookup = self._codes[chunk]
        flat = candidates.reshape(B * b, L).tolist()
        try:
            rows = self._members[chunk][torch.tensor([lookup[tuple(c)] for c in flat], dtype=torch.long)]
        except KeyError as e:
            raise ValueError(f"candidate code {list(e.args[0])} is not a code of chunk {chunk}") from None
        feats = self.features[rows.clamp_min(0)]  # [B*b, m, D]
        q = torch.nn.functional.normalize(query_features.float().cpu(), dim=-1)
        cos = torch.einsum("nmd,nd->nm", feats, q.repeat_interleave(b, dim=0))
        cos = cos.masked_fill(rows < 0, float("-inf"))
        return cos.max(-1).values.view(B, b).to(candidates.device)


class GalleryTeacher:
    """The training gallery's image features and codes, for :func:`~avg.objectives.retrieval.distilled_code_loss`.

    ``similarity(query_features)`` -> [B, G] ``scale * cos`` against the gallery's G images, in the
    gallery's order; ``tokens`` [G, L] their codes as token ids (the codes of the training index).
    """

    def __init__(self, image_features, image_rows: Mapping[str, int], gallery, vocab, *, scale: float, device=None):
        _check_rows(gallery, image_rows)
        rows = np.array([image_rows[i] for i in gallery.image_ids], dtype=np.int64)
        feats = torch.from_numpy(np.array(image_features[rows], dtype=np.float32))
        self.features = torch.nn.functional.normalize(feats, dim=-1).to(device)
        self.tokens = vocab.code_to_token_ids(gallery.codes).to(device)
        self.scale = float(scale)

    def similarity(self, query_features: torch.Tensor) -> torch.Tensor:
        q = torch.nn.functional.normalize(query_features.float().to(self.features.device), dim=-1)
        return self.scale * q @ self.features.T


__all__ = ["CodeTeacher", "GalleryTeacher"]
