"""Constrained beam search over a gallery's voken codes (paper Sec. 3.3, inference).

The retriever generates an image code token by token; only continuations of gallery codes are
allowed, and the finished beams, ranked by summed token log-probabilities, are the ranked images.

What this computes, exactly
---------------------------
* Default path: at every step the log-probabilities are ``log_softmax`` over the model's FULL
  vocabulary, then restricted to the allowed tokens -- the same numbers HF ``generate`` gets with a
  ``prefix_allowed_tokens_fn``. A beam's score is therefore the true sequence log-probability
  ``sum_t log p(c_t | c_<t, query)`` of its code. Beam selection is the standard one (keep the
  ``num_beams`` best (beam, token) continuations per step), so the ranking equals HF ``generate``
  with ``num_beams = num_return_sequences = b`` over a plain dict trie (tested in
  ``tests/test_search.py``; compare with ``length_penalty=0.0`` to get raw sums from HF, any
  length penalty gives the same order because all codes have the same length).
* EOS: ``eos_token_id=None`` scores the L vokens only. With ``eos_token_id`` given, one more step
  forces EOS after the L-th voken and adds ``log p(EOS | code, query)`` -- the full probability of
  the target sequence a T5 trained on ``code + </s>`` labels was trained on, and what HF scores when
  the trie ends every code with EOS. Use it for models trained with EOS-terminated labels.
* Fast path (``voken_ids`` given): the output head is evaluated only on the voken rows (plus EOS
  when given) and ``log_softmax`` is taken over that subset. This RENORMALISES over vokens:
  scores are ``sum_t log p(c_t | ..., token in vokens)``, larger than the full-vocabulary scores by
  ``-sum_t log P_t(vokens)``, a term that depends on the prefix, so the ranking (and the beams
  pruned on the way) CAN differ from the default path. They coincide when the model puts (almost)
  no mass outside the vokens, which a trained retriever nearly does. Tested: fast-path scores equal
  the teacher-forced renormalised log-probabilities.
* ``normalize="children"``: at every step the log-probabilities are renormalised over the tokens
  the index allows after each beam's prefix: ``log p(c_t | c_<t, query, c_t continues a gallery
  code)``. A code's score is then the log-probability of the model's distribution *restricted to
  the gallery's prefix tree*, so mass the model puts on tokens that cannot follow (other levels'
  vokens, text tokens) costs no beam anything, and the EOS step is skipped (after a complete code EOS
  is the only allowed token: log 1 = 0). Only the allowed children's logits are needed, so with
  ``voken_ids`` the restricted head gives bit-for-bit the same result, faster. This is the score the
  retriever is trained with under ``--loss children`` and the one its evaluation uses by default.
  At the index's evidence depths (avg.search.code_index) the voken is scored from the first step's
  logits, renormalised over the level's whole alphabet, the same for every beam; the decoder runs no
  step for evidence levels at the end of the code.
* Ties: candidates with bit-identical scores are ordered by ``torch.topk`` (implementation
  defined), as in HF. Distinct images with the same code collapse to one code here; the caller
  breaks those ties by its documented, seeded rule.
* ``num_beams`` larger than the gallery: K = min(num_beams, distinct codes) beams are returned for
  every query; all are valid (a valid prefix always has a continuation).
* ``index=None``: the same search with no mask over fixed-length outputs (``code_len`` required);
  used by the benchmark as the cost of beam search without constraints.

Models: encoder-decoder (T5, BART, ...) encode once, then the decoder steps with the KV cache;
decoder-only (LLaMA, ...) run the LEFT-padded prompt once, then step; codes start right after the
prompt. The first step runs one row per query (all beams share the root), the cache is expanded
to ``num_beams`` rows afterwards; the cross-attention cache is never reordered (beams of one query
share it), only the self-attention cache is. Both kinds are tested equal to HF ``generate``.
The model's train/eval mode is left alone (call ``model.eval()``; a warning is raised otherwise).
The fast path swaps the output head (``get/set_output_embeddings``) for the duration of the call,
so it needs an ``nn.Linear`` head that produces the logits by itself (T5, LLaMA; not BART, whose
``final_logits_bias`` is added outside the head).
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avg.search.code_index import CodeIndex

__all__ = ["NORMALIZE_MODES", "SearchOutput", "constrained_beam_search"]


@dataclass
class SearchOutput:
    """Ranked codes per query: ``sequences`` [B, K, L] token ids, ``scores`` [B, K] summed log-probs
    (descending), ``num_valid`` [B]; invalid slots hold -1 / -inf."""

    sequences: torch.Tensor
    scores: torch.Tensor
    num_valid: torch.Tensor


# ---------------------------------------------------------------------------------------- model steppers
class _EncoderDecoderStepper:
    """Encode once, then step the decoder with its KV cache (transformers' ``cache`` argument)."""

    def __init__(self, model, decoder_start_token_id: int):
        self.model = model
        self.start = decoder_start_token_id

    def first(self, input_ids, attention_mask, inputs_embeds=None):
        if inputs_embeds is not None:
            enc = self.model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True)
        else:
            enc = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        self.enc_hidden = enc.last_hidden_state
        self.enc_mask = attention_mask
        start = torch.full((attention_mask.shape[0], 1), self.start, dtype=torch.long, device=attention_mask.device)
        out = self.model(encoder_outputs=(self.enc_hidden,), attention_mask=attention_mask,
                         decoder_input_ids=start, use_cache=True, return_dict=True)
        self.cache = out.cache
        return out.logits[:, -1]

    def expand(self, num_beams: int):
        self.enc_hidden = self.enc_hidden.repeat_interleave(num_beams, dim=0)
        self.enc_mask = self.enc_mask.repeat_interleave(num_beams, dim=0)
        cross = getattr(self.cache, "cross_attention_cache", None)
        if cross is None:  # a model without an EncoderDecoderCache: reorder everything
            self._self_cache = self.cache
            self._expanded_cross = False
        else:
            cross.batch_repeat_interleave(num_beams)
            self._self_cache = self.cache.self_attention_cache
            self._expanded_cross = True

    def step(self, rows, tokens):
        """``rows`` [R]: which previous row each new row continues; ``tokens`` [R]: its new token."""
        if self._expanded_cross:
            self._self_cache.reorder_cache(rows)
        else:  # pragma: no cover - every encoder-decoder in transformers 5 uses EncoderDecoderCache
            self.cache.reorder_cache(rows)
        out = self.model(encoder_outputs=(self.enc_hidden,), attention_mask=self.enc_mask,
                         decoder_input_ids=tokens[:, None], cache=self.cache,
                         use_cache=True, return_dict=True)
        self.cache = out.cache
        return out.logits[:, -1]


class _DecoderOnlyStepper:
    """Run the left-padded prompt once, then step; positions follow the attention mask like HF."""

    def __init__(self, model):
        self.model = model

    def first(self, input_ids, attention_mask, inputs_embeds=None):
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("decoder-only prompts must be LEFT-padded (attention_mask[:, -1] must be 1)")
        pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids}
        out = self.model(**inputs, attention_mask=attention_mask, position_ids=pos,
                         use_cache=True, return_dict=True, **extra)
        self.cache = out.cache
        self.mask = attention_mask
        self.next_pos = pos[:, -1] + 1
        return out.logits[:, -1]

    def expand(self, num_beams: int):
        pass  # rows are expanded by the first reorder (index_select with repeated rows)

    def step(self, rows, tokens):
        self.cache.reorder_cache(rows)
        self.mask = torch.cat([self.mask.index_select(0, rows), self.mask.new_ones(rows.numel(), 1)], dim=1)
        pos = self.next_pos.index_select(0, rows)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=pos[:, None],
                         cache=self.cache, use_cache=True, return_dict=True)
        self.cache = out.cache
        self.next_pos = pos + 1
        return out.logits[:, -1]


@contextlib.contextmanager
def _restricted_head(model, token_ids: torch.Tensor):
    """Temporarily replace the output head by its rows ``token_ids`` (fast path).

    Keeps the model's own forward (e.g. T5's output scaling) and restores the head afterwards."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"fast path needs an nn.Linear output head, got {type(head).__name__}")
    # skip_init: no random initialisation of weights that are overwritten below -- it would draw from the
    # global RNG, so that every search (an evaluation, a stage-2 candidate mining) changed the dropout of
    # the training that follows it
    sub = nn.utils.skip_init(nn.Linear, head.in_features, token_ids.numel(), bias=head.bias is not None,
                             device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        sub.weight.copy_(head.weight[token_ids])
        if head.bias is not None:
            sub.bias.copy_(head.bias[token_ids])
    model.set_output_embeddings(sub)
    try:
        yield
    finally:
        model.set_output_embeddings(head)


# ---------------------------------------------------------------------------------------- the search
NORMALIZE_MODES = ("vocab", "children")


def constrained_beam_search(
    model,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    index: CodeIndex | None,
    num_beams: int,
    *,
    decoder_start_token_id: int | None = None,
    eos_token_id: int | None = None,
    voken_ids: torch.Tensor | None = None,
    batch_size: int | None = None,
    code_len: int | None = None,
    inputs_embeds: torch.Tensor | None = None,
    normalize: str = "vocab",
) -> SearchOutput:
    """Beam search restricted to the codes in ``index`` (see module docstring for what is scored).

    ``input_ids``/``attention_mask`` [B, T]: the tokenised queries (right padding for
    encoder-decoders, LEFT padding for decoder-only prompts). ``inputs_embeds`` [B, T, H] replaces
    ``input_ids`` (e.g. soft prefix tokens before the caption's token embeddings; the first pass
    then runs on embeddings). ``batch_size`` bounds how many queries are decoded at once (None:
    all). ``code_len`` is only needed when ``index`` is None. ``normalize``: ``"vocab"`` (log-softmax
    over the full vocabulary, or over ``voken_ids`` when given: the HF-equivalent score) or
    ``"children"`` (renormalised over the allowed continuations; needs ``index``; EOS is not scored).
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if normalize == "children" and index is None:
        raise ValueError("normalize='children' needs an index (the allowed continuations)")
    first_input = inputs_embeds if inputs_embeds is not None else input_ids
    if first_input is None or first_input.dim() < 2 or first_input.shape[0] == 0:
        raise ValueError("input_ids (or inputs_embeds) must be a non-empty [batch, length(, hidden)] tensor, got "
                         f"{None if first_input is None else tuple(first_input.shape)}")
    if model.training:
        warnings.warn("constrained_beam_search on a model in training mode: dropout makes the ranking random; "
                      "call model.eval() first", stacklevel=2)
    if index is None and code_len is None:
        raise ValueError("code_len is required when index is None (unconstrained search)")
    length = index.code_len if index is not None else int(code_len)
    device = next(model.parameters()).device
    n = first_input.shape[0]
    if input_ids is not None:
        input_ids = input_ids.to(device)
    if inputs_embeds is not None:
        inputs_embeds = inputs_embeds.to(device)
    if attention_mask is None:
        attention_mask = torch.ones(first_input.shape[:2], dtype=torch.long, device=device)
    attention_mask = attention_mask.to(device)
    if index is not None and index.device != device:
        index = index.to(device)
    is_enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    if is_enc_dec and decoder_start_token_id is None:
        decoder_start_token_id = model.config.decoder_start_token_id
        if decoder_start_token_id is None and getattr(model, "generation_config", None) is not None:
            decoder_start_token_id = model.generation_config.decoder_start_token_id
        if decoder_start_token_id is None:
            raise ValueError("decoder_start_token_id is not set in the model config; pass it explicitly")
    if normalize == "children":
        eos_token_id = None  # the only continuation of a complete code: log 1 = 0

    head = model.get_output_embeddings()
    vocab = head.out_features if isinstance(head, nn.Linear) else int(model.config.vocab_size)
    if index is not None and index.vocab_size > vocab:
        raise ValueError(f"index vocab_size {index.vocab_size} exceeds the model's output size {vocab}")

    subset = None
    col_of_token = None
    if voken_ids is not None:
        subset = torch.as_tensor(voken_ids, device=device).long().unique()
        if eos_token_id is not None:
            subset = torch.unique(torch.cat([subset, subset.new_tensor([int(eos_token_id)])]))
        if int(subset.max()) >= vocab or int(subset.min()) < 0:
            raise ValueError(f"voken_ids must lie in [0, {vocab})")
        col_of_token = torch.full((max(vocab, index.vocab_size if index is not None else 0),), -1,
                                  dtype=torch.long, device=device)
        col_of_token[subset] = torch.arange(subset.numel(), device=device)
        if index is not None and bool((index.used_tokens()[: col_of_token.numel()] & (col_of_token < 0)).any()):
            raise ValueError("the gallery codes use token ids that are not in voken_ids")

    if index is not None:
        k_out = min(num_beams, index.num_codes)
    else:
        width = subset.numel() if subset is not None else vocab
        k_out = min(num_beams, width ** length)

    step = n if not batch_size else int(batch_size)
    parts = []
    ctx = _restricted_head(model, subset) if subset is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for lo in range(0, n, max(step, 1)):
            if is_enc_dec:
                stepper = _EncoderDecoderStepper(model, decoder_start_token_id)
            else:
                stepper = _DecoderOnlyStepper(model)
            part_ids = input_ids[lo:lo + step] if input_ids is not None else None
            part_emb = inputs_embeds[lo:lo + step] if inputs_embeds is not None else None
            parts.append(_search_batch(stepper, part_ids, attention_mask[lo:lo + step], index, num_beams, length,
                                       eos_token_id, subset, col_of_token, part_emb, normalize))
    seqs = torch.cat([p[0] for p in parts])[:, :k_out]
    scores = torch.cat([p[1] for p in parts])[:, :k_out]
    alive = torch.isfinite(scores)
    seqs = seqs.masked_fill(~alive[..., None], -1)
    return SearchOutput(sequences=seqs, scores=scores, num_valid=alive.sum(1))


def _search_batch(stepper, input_ids, attention_mask, index, num_beams, length, eos_token_id, subset, col_of_token,
                  inputs_embeds=None, normalize="vocab"):
    """One batch of queries; returns (sequences [B, nb, L], scores [B, nb]) sorted by score."""
    bsz = attention_mask.shape[0]
    device = attention_mask.device
    by_children = normalize == "children"
    # "children": raw logits here, normalised over each beam's allowed children below
    norm = (lambda x: x.float()) if by_children else (lambda x: F.log_softmax(x.float(), dim=-1))
    logp = norm(stepper.first(input_ids, attention_mask, inputs_embeds))  # [B, W]
    first = logp  # the first step's distribution scores the evidence levels (avg.search.code_index)
    width = logp.shape[-1]
    neg_inf = torch.tensor(float("-inf"), device=device)
    evidence = set(index.evidence_depths) if (by_children and index is not None) else set()
    # the decoder runs up to the last depth scored by its own step (evidence levels need no step of their own)
    last_own = max((d for d in range(length) if d not in evidence), default=0)

    scores = torch.zeros(bsz, 1, device=device)
    nodes = torch.zeros(bsz, 1, dtype=torch.long, device=device)
    alive = torch.ones(bsz, 1, dtype=torch.bool, device=device)
    seqs = torch.zeros(bsz, 1, 0, dtype=torch.long, device=device)
    row_base = torch.arange(bsz, device=device)[:, None]
    for depth in range(length):
        beams = nodes.shape[1]
        if index is not None:
            # candidates = (beam, allowed child) pairs, children in token order
            child, tok, valid = index.children(nodes, depth)  # [B, r, C]
            valid = valid & alive[..., None]
            col = col_of_token[tok] if col_of_token is not None else tok
            lp = logp.view(bsz, beams, width).gather(2, col)
            if depth in evidence:  # the first step's logits, over the level's alphabet: every beam alike
                alpha = index.level_alphabet(depth)
                alpha = col_of_token[alpha] if col_of_token is not None else alpha
                lp = first[:, None, :].expand(bsz, beams, width).gather(2, col)
                lp = lp - first[:, alpha].logsumexp(-1)[:, None, None]
            elif by_children:
                lp = lp - torch.where(valid, lp, neg_inf).logsumexp(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
            cand = torch.where(valid, scores[..., None] + lp, neg_inf)
            n_child = cand.shape[-1]
        else:
            cand = torch.where(alive[..., None], scores[..., None] + logp.view(bsz, beams, width), neg_inf)
            n_child = width
            tok = subset.view(1, 1, -1).expand(bsz, beams, -1) if subset is not None else None
            child = None
        cand = cand.reshape(bsz, beams * n_child)
        k = min(num_beams, cand.shape[1])
        top, idx = cand.topk(k, dim=1)  # sorted, best first
        src = idx // n_child
        if tok is not None:
            new_tok = tok.reshape(bsz, -1).gather(1, idx)
        else:
            new_tok = idx % n_child
        new_nodes = child.reshape(bsz, -1).gather(1, idx) if child is not None else torch.zeros_like(idx)
        new_alive = torch.isfinite(top)
        if k < num_beams:  # fewer candidates than beams (tiny voken subsets): pad with dead beams
            pad = num_beams - k
            top = torch.cat([top, top.new_full((bsz, pad), float("-inf"))], 1)
            src = torch.cat([src, src[:, :1].expand(-1, pad)], 1)
            new_tok = torch.cat([new_tok, new_tok[:, :1].expand(-1, pad)], 1)
            new_nodes = torch.cat([new_nodes, new_nodes[:, :1].expand(-1, pad)], 1)
            new_alive = torch.cat([new_alive, new_alive.new_zeros(bsz, pad)], 1)
        # dead beams keep a harmless in-range node (their rows are masked out anyway)
        nodes = torch.where(new_alive, new_nodes, torch.zeros_like(new_nodes))
        alive, scores = new_alive, top
        seqs = torch.cat([seqs.gather(1, src[..., None].expand(-1, -1, seqs.shape[2])), new_tok[..., None]], dim=2)
        if depth == 0:
            stepper.expand(num_beams)
        if depth < last_own or eos_token_id is not None:
            rows = (row_base * beams + src).reshape(-1)
            logp = norm(stepper.step(rows, new_tok.reshape(-1)))
    if eos_token_id is not None:
        eos_col = int(col_of_token[eos_token_id]) if col_of_token is not None else int(eos_token_id)
        scores = torch.where(alive, scores + logp[:, eos_col].view(bsz, num_beams), neg_inf)
        scores, order = scores.topk(num_beams, dim=1)
        seqs = seqs.gather(1, order[..., None].expand(-1, -1, seqs.shape[2]))
    return seqs, scores
