"""Which voken may come next: the gallery's codes as a prefix tree, for constrained decoding.

Inference (paper Sec. 3.3) generates an image's code token by token, allowing at each step only
tokens that continue the code of some gallery image. Two structures answer "what may follow this
prefix":

* ``CodeIndex`` -- tensors on the model's device, answers for every beam of a batch at once.
  Nodes of depth ``d`` (unique code prefixes of length ``d``) are numbered in lexicographic
  order, so the children of a node are a contiguous, token-sorted run of the next depth's nodes:
  per depth it stores only ``tokens[d]`` (last token of each depth-``d`` node) and
  ``child_ptr[d]`` (CSR offsets: children of depth-``d`` node ``n`` are nodes
  ``child_ptr[d][n] : child_ptr[d][n + 1]`` of depth ``d + 1``). A child's node id *is* its edge
  index, so a beam carries one integer (its node) and stepping needs no search at all.
  Memory is ``4 * (sum_d N_d + sum_d (N_d + 1))`` bytes, ``N_d`` the number of unique prefixes
  of length ``d`` (about 20 MB for 1M random codes of length 4 over 1024 vokens).
* ``DictTrie`` -- nested Python dicts, what a ``prefix_allowed_tokens_fn`` is usually built on;
  kept as the naive reference for tests and the decoding benchmark.

Evidence levels. By default a step is scored over the children of its prefix (the continuations
the gallery allows: ``scored_tokens`` returns them). A depth listed in ``evidence_depths`` is scored
over its level's whole alphabet instead -- every token any gallery code has at that depth -- and
from the distribution of the code's FIRST step (``scored_step``), which has read the caption and no
voken. Such a level's voken stays a constraint of the search, but its log-probability is the
caption's evidence for that value, the same for every image carrying it, even after a prefix that
leaves one image (where the children score is log 1 = 0). Read at its own position instead, after
a prefix that names one training image, the model learns to look the value up from the prefix and
ignores the caption (measured on the demo: test R@1 8.54 against 11.66 without the level).
avg.models.layout's layout vokens use it.

Both take codes as *token ids* (the gallery's voken codes already mapped to the model's vocabulary),
so any vocabulary layout works, including a separate token range per code position.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

__all__ = ["CodeIndex", "DictTrie", "InvalidPrefixError", "code_log_probs"]


class InvalidPrefixError(ValueError):
    """A prefix that no gallery code starts with: decoding must never continue it unconstrained."""


def _as_code_tensor(token_codes, vocab_size: int) -> torch.Tensor:
    codes = torch.as_tensor(token_codes)
    if codes.dim() != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(
            f"token_codes must be a non-empty [num_codes, code_len] tensor, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"token_codes must hold integer token ids, got dtype {codes.dtype}")
    codes = codes.long()
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= vocab_size:
        bad = int(((codes < 0) | (codes >= vocab_size)).any(dim=1).nonzero()[0])
        raise ValueError(
            f"token_codes row {bad} = {codes[bad].tolist()} has a token id outside [0, {vocab_size})"
        )
    return codes


def _sorted_unique_rows(codes: torch.Tensor) -> torch.Tensor:
    """Unique rows in lexicographic order: L stable sorts (much faster than torch.unique(dim=0) on CPU)."""
    order = torch.arange(codes.shape[0], device=codes.device)
    for d in range(codes.shape[1] - 1, -1, -1):
        order = order[torch.argsort(codes[order, d], stable=True)]
    codes = codes[order]
    keep = torch.ones(codes.shape[0], dtype=torch.bool, device=codes.device)
    keep[1:] = (codes[1:] != codes[:-1]).any(dim=1)
    return codes[keep]


class CodeIndex:
    """Prefix tree of unique codes as per-depth CSR tensors (see module docstring).

    Build with :meth:`from_codes`. Depth ``d`` runs from 0 (the root, one node) to ``code_len``
    (the leaves, one per unique code; leaf ``i`` is row ``i`` of the lexicographically sorted
    unique codes).
    """

    def __init__(self, tokens: list[torch.Tensor], child_ptr: list[torch.Tensor], vocab_size: int,
                 evidence_depths: Iterable[int] = ()) -> None:
        # tokens[d] for d = 0..L (tokens[0] is an empty placeholder for the root);
        # child_ptr[d] for d = 0..L-1, length N_d + 1.
        self.tokens = tokens
        self.child_ptr = child_ptr
        self.vocab_size = int(vocab_size)
        self.evidence_depths = tuple(sorted({int(d) for d in evidence_depths}))
        bad = [d for d in self.evidence_depths if not 0 <= d < len(child_ptr)]
        if bad:
            raise ValueError(f"evidence_depths {bad} outside [0, {len(child_ptr)}) (code_len = {len(child_ptr)})")
        self._used_tokens: torch.Tensor | None = None
        self._alphabets: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(cls, token_codes: torch.Tensor, vocab_size: int, device=None,
                   evidence_depths: Iterable[int] = ()) -> "CodeIndex":
        """Index the rows of ``token_codes`` [G, L] (duplicates allowed; they collapse to one leaf);
        ``evidence_depths``: the depths scored over their level's alphabet (module docstring)."""
        codes = _as_code_tensor(token_codes, vocab_size)
        if device is not None:
            codes = codes.to(device)
        codes = _sorted_unique_rows(codes)
        n, length = codes.shape
        tokens: list[torch.Tensor] = [codes.new_zeros(0, dtype=torch.int32)]
        child_ptr: list[torch.Tensor] = []
        # node id at the current depth of every code row (depth 0: everyone is at the root)
        row_node = codes.new_zeros(n)
        n_prev = 1
        changed = torch.zeros(max(n - 1, 0), dtype=torch.bool, device=codes.device)
        for d in range(1, length + 1):
            # a new depth-d node starts wherever the length-d prefix differs from the previous row
            changed = changed | (codes[1:, d - 1] != codes[:-1, d - 1])
            is_start = torch.cat([changed.new_ones(1), changed])
            new_row_node = torch.cumsum(is_start.long(), 0) - 1
            starts = is_start.nonzero().squeeze(1)
            tokens.append(codes[starts, d - 1].to(torch.int32))
            parent = row_node[starts]
            counts = torch.bincount(parent, minlength=n_prev)
            child_ptr.append(torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32))
            row_node = new_row_node
            n_prev = int(starts.numel())
        return cls(tokens, child_ptr, vocab_size, evidence_depths)

    # ------------------------------------------------------------------ properties
    @property
    def code_len(self) -> int:
        return len(self.child_ptr)

    @property
    def num_codes(self) -> int:
        """Number of distinct codes (leaves)."""
        return int(self.tokens[-1].numel())

    @property
    def device(self) -> torch.device:
        return self.tokens[-1].device

    @property
    def nbytes(self) -> int:
        """Bytes held by the index tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.tokens, *self.child_ptr))

    def used_tokens(self) -> torch.Tensor:
        """Bool [vocab_size]: token ids that occur anywhere in the codes (computed once, cached)."""
        if self._used_tokens is None:
            used = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            for t in self.tokens[1:]:
                used[t.long()] = True
            self._used_tokens = used
        return self._used_tokens

    def num_nodes(self, depth: int) -> int:
        return 1 if depth == 0 else int(self.tokens[depth].numel())

    def to(self, device) -> "CodeIndex":
        return CodeIndex([t.to(device) for t in self.tokens], [p.to(device) for p in self.child_ptr], self.vocab_size,
                         self.evidence_depths)

    def __repr__(self) -> str:
        evidence = f", evidence_depths={list(self.evidence_depths)}" if self.evidence_depths else ""
        return (f"CodeIndex(num_codes={self.num_codes}, code_len={self.code_len}, vocab_size={self.vocab_size}, "
                f"nbytes={self.nbytes}, device={self.device}{evidence})")

    def level_alphabet(self, depth: int) -> torch.Tensor:
        """Sorted token ids that some code has at position ``depth`` (computed once per depth, cached)."""
        if not 0 <= depth < self.code_len:
            raise ValueError(f"depth {depth} outside [0, {self.code_len})")
        if depth not in self._alphabets:
            self._alphabets[depth] = torch.unique(self.tokens[depth + 1].long())
        return self._alphabets[depth]

    # ------------------------------------------------------------------ vectorised queries
    def child_range(self, nodes: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[start, end) of the children (= node ids at ``depth + 1``) of depth-``depth`` ``nodes``."""
        if not 0 <= depth < self.code_len:
            raise ValueError(f"depth {depth} has no children (code_len = {self.code_len})")
        ptr = self.child_ptr[depth]
        nodes = nodes.long()
        return ptr[nodes].long(), ptr[nodes + 1].long()

    def children(self, nodes: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Children of every node, padded: ``(child_ids [R, C], child_tokens [R, C], valid [R, C])``.

        ``C`` is the largest child count among ``nodes``; padded slots have ``valid`` False and
        repeat a real child so they can be gathered safely. Every node of depth < code_len has at
        least one child, so a valid prefix never gets an empty set.
        """
        start, end = self.child_range(nodes.reshape(-1), depth)
        counts = end - start
        width = max(int(counts.max()) if counts.numel() else 1, 1)
        offs = torch.arange(width, device=start.device)
        valid = offs[None, :] < counts[:, None]
        child = start[:, None] + torch.minimum(offs[None, :], (counts - 1).clamp_min(0)[:, None])
        tok = self.tokens[depth + 1][child].long()
        shape = (*nodes.shape, width)
        return child.reshape(shape), tok.reshape(shape), valid.reshape(shape)

    def scored_step(self, depth: int) -> int:
        """The step whose distribution scores the voken at ``depth``: 0 (the caption alone) at an evidence
        depth, else ``depth`` (module docstring)."""
        return 0 if depth in self.evidence_depths else depth

    def scored_tokens(self, nodes: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens a step from each node at ``depth`` is normalised over: ``(tokens [.., C], valid [.., C])``.

        The node's children (as :meth:`children`), or at an evidence depth its level's whole alphabet
        (the same for every node; module docstring)."""
        if depth in self.evidence_depths:
            alpha = self.level_alphabet(depth)
            tok = alpha.expand(*nodes.shape, alpha.numel())
            return tok, torch.ones_like(tok, dtype=torch.bool)
        _, tok, valid = self.children(nodes, depth)
        return tok, valid

    def find_child(self, nodes: torch.Tensor, depth: int, tokens: torch.Tensor) -> torch.Tensor:
        """Child node of ``nodes`` reached by ``tokens``, or -1 where no code continues that way.

        A branch-free binary search over each node's sorted run of child tokens, for all rows at once.
        """
        start, end = self.child_range(nodes.reshape(-1), depth)
        toks = tokens.reshape(-1).long()
        level = self.tokens[depth + 1]
        lo, hi = start.clone(), end.clone()  # search in [lo, hi)
        width = int((end - start).max()) if start.numel() else 0
        for _ in range(max(width, 1).bit_length()):
            active = lo < hi
            mid = torch.where(active, (lo + hi) // 2, lo).clamp_max(max(level.numel() - 1, 0))
            go_right = active & (level[mid].long() < toks)
            lo = torch.where(go_right, mid + 1, lo)
            hi = torch.where(active & ~go_right, mid, hi)
        safe = lo.clamp_max(max(level.numel() - 1, 0))
        found = (lo < end) & (level[safe].long() == toks)
        return torch.where(found, lo, torch.full_like(lo, -1)).reshape(tokens.shape)

    def lookup(self, prefixes: torch.Tensor) -> torch.Tensor:
        """Node ids of token prefixes [R, d] (0 <= d <= code_len); raises InvalidPrefixError."""
        prefixes = torch.as_tensor(prefixes, device=self.device).long()
        if prefixes.dim() != 2 or prefixes.shape[1] > self.code_len:
            raise ValueError(f"prefixes must be [rows, d] with d <= {self.code_len}, got {tuple(prefixes.shape)}")
        nodes = torch.zeros(prefixes.shape[0], dtype=torch.long, device=self.device)
        for d in range(prefixes.shape[1]):
            nodes = self.find_child(nodes, d, prefixes[:, d])
            bad = nodes < 0
            if bool(bad.any()):
                row = int(bad.nonzero()[0])
                raise InvalidPrefixError(
                    f"prefix row {row} = {prefixes[row, :d + 1].tolist()} is not a prefix of any gallery code")
        return nodes

    def allowed_mask(self, nodes: torch.Tensor, depth: int, active: torch.Tensor | None = None) -> torch.Tensor:
        """Bool mask [R, vocab_size] of the tokens allowed after each depth-``depth`` node.

        Rows where ``active`` is False get an all-False mask (dead beams)."""
        nodes = nodes.reshape(-1)
        _, tok, valid = self.children(nodes, depth)
        if active is not None:
            valid = valid & active.reshape(-1, 1)
        mask = torch.zeros(nodes.numel(), self.vocab_size, dtype=torch.bool, device=self.device)
        rows = torch.arange(nodes.numel(), device=self.device)[:, None].expand_as(tok)
        mask[rows[valid], tok[valid]] = True
        return mask

    def allowed_tokens(self, prefixes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Allowed next tokens of each prefix [R, d], d < code_len: ``(tokens [R, C] padded with -1, counts [R])``."""
        prefixes = torch.as_tensor(prefixes, device=self.device).long()
        depth = prefixes.shape[1]
        if depth >= self.code_len:
            raise ValueError(f"a prefix of length {depth} is a complete code (code_len = {self.code_len})")
        nodes = self.lookup(prefixes)
        _, tok, valid = self.children(nodes, depth)
        return tok.masked_fill(~valid, -1), valid.sum(1)

    def codes(self) -> torch.Tensor:
        """The sorted unique codes [num_codes, code_len] (rebuilt from the tree; leaf i is row i)."""
        length = self.code_len
        out = torch.empty(self.num_codes, length, dtype=torch.long, device=self.device)
        nodes = torch.arange(self.num_codes, device=self.device)
        for d in range(length, 0, -1):
            out[:, d - 1] = self.tokens[d][nodes].long()
            if d > 1:  # parent = the depth-(d-1) node whose child run holds `nodes`
                nodes = torch.searchsorted(self.child_ptr[d - 1].long(), nodes, right=True) - 1
        return out

    def prefix_allowed_tokens_fn(
        self, prompt_len: int, eos_token_id: int | None = None
    ) -> Callable[[int, torch.Tensor], list[int]]:
        """An HF ``generate(prefix_allowed_tokens_fn=...)`` callable backed by this index (one row per call)."""
        def fn(batch_id: int, sent: torch.Tensor) -> list[int]:
            prefix = sent[prompt_len:].reshape(1, -1)
            if prefix.shape[1] == self.code_len:
                if eos_token_id is None:
                    raise InvalidPrefixError("code complete and no eos_token_id given")
                self.lookup(prefix)
                return [int(eos_token_id)]
            tok, count = self.allowed_tokens(prefix)
            return tok[0, : int(count[0])].tolist()
        return fn


class DictTrie:
    """Nested-dict prefix tree: the plain reference (and what HF users usually write)."""

    def __init__(self, codes: Iterable[Sequence[int]]) -> None:
        self.root: dict = {}
        self.code_len: int | None = None
        for code in codes:
            code = [int(t) for t in code]
            if self.code_len is None:
                self.code_len = len(code)
            elif len(code) != self.code_len:
                raise ValueError(f"all codes must have length {self.code_len}, got {code}")
            node = self.root
            for t in code:
                node = node.setdefault(t, {})

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that may follow ``prefix``; raises InvalidPrefixError if no code starts with it."""
        node = self.root
        for i, t in enumerate(prefix):
            try:
                node = node[int(t)]
            except KeyError:
                bad = [int(x) for x in prefix[: i + 1]]
                raise InvalidPrefixError(f"prefix {bad} is not a prefix of any gallery code") from None
        return list(node)

    def prefix_allowed_tokens_fn(
        self, prompt_len: int, eos_token_id: int | None = None
    ) -> Callable[[int, torch.Tensor], list[int]]:
        """The usual HF callable: strip the prompt (decoder start token or LM prompt), walk the trie.

        After a complete code only ``eos_token_id`` is allowed (when given)."""
        def fn(batch_id: int, sent: torch.Tensor) -> list[int]:
            prefix = sent[prompt_len:].tolist()
            if eos_token_id is not None and len(prefix) == self.code_len:
                self.allowed(prefix)
                return [int(eos_token_id)]
            return self.allowed(prefix)
        return fn


def code_log_probs(logits: torch.Tensor, targets: torch.Tensor, index: Optional[CodeIndex] = None) -> torch.Tensor:
    """Per-position log-probabilities [N, L] of the codes ``targets`` [N, L] (token ids) from
    teacher-forced ``logits`` [N, L, V] (position t predicts ``targets[:, t]``).

    ``index=None``: log-softmax over the full vocabulary. With ``index``: renormalised over the
    children of each target prefix in the index (at its evidence depths over the level's alphabet, from
    the first step's logits: avg.search.code_index); a target that is not a code of the index raises.
    """
    logits = logits.float()
    if index is None:
        return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    n, length = targets.shape
    if length > index.code_len:
        raise ValueError(f"targets of length {length} for an index of codes of length {index.code_len}")
    index = index.to(logits.device) if index.device != logits.device else index
    nodes = torch.zeros(n, dtype=torch.long, device=logits.device)
    out = []
    for t in range(length):
        tok, valid = index.scored_tokens(nodes, t)  # [N, C]
        step = logits[:, index.scored_step(t)]
        allowed = step.gather(1, tok).masked_fill(~valid, float("-inf"))
        out.append(step.gather(1, targets[:, t:t + 1]).squeeze(1) - allowed.logsumexp(1))
        nodes = index.find_child(nodes, t, targets[:, t])
        if bool((nodes < 0).any()):
            row = int((nodes < 0).nonzero()[0])
            raise ValueError(f"target row {row} = {targets[row].tolist()} is not a code of the index")
    return torch.stack(out, 1)
