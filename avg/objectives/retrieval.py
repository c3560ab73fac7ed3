"""The retriever's losses: generative (eq. 7) and listwise discriminative (eqs. 8-10).

A code's score
--------------
Every place that scores a code for a query uses one definition, chosen by ``normalize``:

* ``"children"`` (default): ``sum_t log p(c_t | query, c_<t)`` with each step's distribution
  renormalised over the tokens that may follow ``c_<t`` in a gallery's prefix tree (a
  :class:`~avg.search.code_index.CodeIndex`). This is what the constrained search ranks by with
  ``normalize="children"``; training with it (``--loss children``) spends the model's probability
  only among real alternatives -- never on another level's vokens or on text tokens.
* ``"vocab"``: log-softmax over the full vocabulary (the paper's eq. 7 as a plain LM loss, and the
  HF ``generate`` score); the generative loss then also scores EOS after the code.

``score_len`` limits the score to the first positions of a code (the M quantizer levels): a
disambiguation position, when codes carry one, says nothing about the image and is left out.

Pure functions over an encoder-decoder model: no I/O, no optimiser, no global RNG (the positive's
replacement slot comes from an explicit ``torch.Generator``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from avg.search.code_index import CodeIndex, code_log_probs
from avg.retriever.prefix import prefixed_inputs

LOSS_MODES = ("children", "vocab")


def build_candidates(sequences: torch.Tensor, num_valid: torch.Tensor, positive: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Beam candidates [B, b, L] + the positive's code [B, L] -> (candidates, mask, positive index).

    eq. 8: the candidates are the b beams. When the positive is not among the valid beams it takes
    a slot (Sec. 3.2: "randomly replace one image ... with the positive image"): the first empty
    slot when the search returned fewer than b beams (no negative is lost), otherwise a uniformly
    random slot drawn from `generator`. `mask` marks real candidates (empty slots are excluded).
    """
    cands = sequences.clone()
    B, b, L = cands.shape
    positive = positive.to(cands.device)
    num_valid = num_valid.to(cands.device).clamp(max=b)
    mask = torch.arange(b, device=cands.device)[None, :] < num_valid[:, None]
    match = (cands == positive[:, None, :]).all(-1) & mask
    pos_index = torch.empty(B, dtype=torch.long, device=cands.device)
    for i in range(B):
        hit = torch.nonzero(match[i]).flatten()
        if hit.numel():
            pos_index[i] = hit[0]
            continue
        nv = int(num_valid[i])
        slot = nv if nv < b else int(torch.randint(b, (1,), generator=generator))
        cands[i, slot] = positive[i]
        mask[i, slot] = True
        pos_index[i] = slot
    # empty slots hold -1; give them a real code so the teacher-forced pass can embed them (masked out)
    cands = torch.where(mask[..., None], cands, positive[:, None, :].expand_as(cands))
    return cands, mask, pos_index


@torch.no_grad()
def mine_candidates(model, prefix, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    query_features: Optional[torch.Tensor], index: CodeIndex, num_beams: int, positive: torch.Tensor, *,
                    eos_token_id: Optional[int] = None, voken_ids: Optional[torch.Tensor] = None,
                    normalize: str = "children", generator: Optional[torch.Generator] = None):
    """eq. 8: each query's candidate list -- the model's own top-``num_beams`` codes in the gallery
    ``index`` (searched in eval mode, scored like the evaluation search), with the positive code
    ``positive`` [B, L] put in by :func:`build_candidates` where the beam missed it.

    Returns ``(candidates [B, b, L], mask [B, b], positive_index [B], found [B])``, ``found`` marking
    the lists whose beam returned the positive itself. The models' train/eval modes are restored.
    """
    from avg.search.beam import constrained_beam_search

    modules = [m for m in (model, prefix) if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        inputs = prefixed_inputs(model, prefix, input_ids, attention_mask, query_features)
        out = constrained_beam_search(model, inputs.get("input_ids"), inputs["attention_mask"], index, num_beams,
                                      decoder_start_token_id=model.config.decoder_start_token_id,
                                      eos_token_id=eos_token_id, voken_ids=voken_ids,
                                      inputs_embeds=inputs.get("inputs_embeds"), normalize=normalize)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    found = (out.sequences == positive[:, None, :].to(out.sequences.device)).all(-1).any(-1)
    cands, mask, pidx = build_candidates(out.sequences, out.num_valid, positive, generator=generator)
    return cands, mask, pidx, found


def distilled_code_loss(logits: torch.Tensor, targets: torch.Tensor, index: CodeIndex, teacher_sim: torch.Tensor,
                        gallery_tokens: torch.Tensor, mix: float) -> torch.Tensor:
    """Per-position generative loss [N, L] with a teacher's soft target (``--gen-teacher-mix``).

    At each position t, over the children of the gold prefix ``targets[:, :t]`` in ``index`` (the
    ``"children"`` score): ``(1 - mix) * -log p(c_t) + mix * CE(q_t, p)``, where the teacher's
    ``q_t(c)`` is proportional to ``sum exp(teacher_sim[i])`` over the gallery images ``i`` whose code
    starts with ``targets[:, :t] + [c]``. ``teacher_sim`` [N, G] scores the gallery's G images for
    each query (e.g. ``scale * cos`` of CLIP features), ``gallery_tokens`` [G, L] are their codes as
    token ids, the codes ``index`` was built from; ``mix = 0`` is the plain children loss.
    Sums of exponentials are taken per child in the log domain (any scale is safe).
    """
    logits = logits.float()
    n, length = targets.shape
    index = index.to(logits.device) if index.device != logits.device else index
    sim = teacher_sim.detach().float().to(logits.device)
    gallery_tokens = gallery_tokens.to(logits.device).long()
    if gallery_tokens.shape != (sim.shape[1], index.code_len) or length > index.code_len:
        raise ValueError(f"teacher_sim {tuple(sim.shape)} and gallery_tokens {tuple(gallery_tokens.shape)} do not "
                         f"match targets {tuple(targets.shape)} and an index of codes of length {index.code_len}")
    vocab = logits.shape[-1]
    nodes = torch.zeros(n, dtype=torch.long, device=logits.device)
    match = torch.ones_like(sim, dtype=torch.bool)  # gallery images under the gold prefix
    out = []
    for t in range(length):
        tok, valid = index.scored_tokens(nodes, t)  # [N, C]
        logp = logits[:, index.scored_step(t)].gather(1, tok).masked_fill(~valid, float("-inf")).log_softmax(1)
        gold = (tok == targets[:, t:t + 1]) & valid
        hard = -logp.masked_fill(~gold, 0.0).sum(1)
        where = gallery_tokens[:, t].expand(n, -1)
        under = sim.masked_fill(~match, float("-inf"))
        peak = torch.full((n, vocab), float("-inf"), device=sim.device).scatter_reduce(1, where, under, "amax")
        peak_of = peak.gather(1, where)
        summed = torch.zeros(n, vocab, device=sim.device).scatter_add(
            1, where, torch.where(match, (under - peak_of).exp(), torch.zeros_like(sim)))
        log_mass = (summed.gather(1, tok).log() + peak.gather(1, tok)).masked_fill(~valid, float("-inf"))
        q = log_mass.softmax(1).nan_to_num(0.0)
        soft = -(q * logp.masked_fill(~valid, 0.0)).sum(1)
        out.append((1.0 - mix) * hard + mix * soft)
        nodes = index.find_child(nodes, t, targets[:, t])
        if bool((nodes < 0).any()):
            row = int((nodes < 0).nonzero()[0])
            raise ValueError(f"target row {row} = {targets[row].tolist()} is not a code of the index")
        match &= gallery_tokens[None, :, t] == targets[:, t:t + 1]
    return torch.stack(out, 1)


def _decoder_inputs(model, codes: torch.Tensor) -> torch.Tensor:
    start = torch.full((codes.shape[0], 1), model.config.decoder_start_token_id, dtype=codes.dtype, device=codes.device)
    return torch.cat([start, codes[:, :-1]], dim=1)


def candidate_log_probs(model, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor,
                        candidates: torch.Tensor, index: Optional[CodeIndex] = None,
                        score_len: Optional[int] = None) -> torch.Tensor:
    """s_j: each candidate's score (see the module docstring), teacher-forced, WITH gradient.

    encoder_hidden [B, S, H] (the encoder run once per query), candidates [B, b, L] token ids ->
    scores [B, b]: the sum of the first ``score_len`` (default all L) positions' log-probabilities,
    over the full vocabulary (``index=None``) or renormalised over ``index``'s children (the
    gallery the candidates were searched in). No EOS: the search scores codes alike.
    """
    B, b, L = candidates.shape
    flat = candidates.reshape(B * b, L)
    hidden = encoder_hidden.repeat_interleave(b, dim=0)
    mask = attention_mask.repeat_interleave(b, dim=0)
    out = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
                decoder_input_ids=_decoder_inputs(model, flat), use_cache=False)
    lp = code_log_probs(out.logits, flat, index)
    return lp[:, : (score_len or L)].sum(-1).view(B, b)


def discriminative_loss(scores: torch.Tensor, positive_index: torch.Tensor, *, temperature: float = 1.0,
                        mask: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """eq. 9: -log softmax(s / T)[positive], a cross-entropy over the candidates' logits.

    Empty slots (mask False) get -inf so they take no probability mass; the mean is over the lists
    given (RetrievalObjective passes only the lists ``list_mask`` keeps). ``targets`` [B, b] (rows summing
    to 1, zero on empty slots; :func:`teacher_targets`) replaces the one-hot target by a
    distribution: ``-sum_j targets_j log softmax(s / T)_j``.
    """
    logits = scores / temperature
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    if targets is None:
        per_list = F.cross_entropy(logits, positive_index, reduction="none")
    else:
        logp = logits.log_softmax(-1)
        per_list = -(targets.to(logp.dtype) * logp.masked_fill(targets == 0, 0.0)).sum(-1)
    return per_list.mean()


def teacher_targets(teacher_scores: torch.Tensor, positive_index: torch.Tensor, mask: torch.Tensor, *,
                    mix: float, scale: float) -> torch.Tensor:
    """L_dis's target [B, b]: ``(1 - mix) * onehot(positive) + mix * softmax(scale * teacher)``, the
    softmax over the real candidates (``mask``) only; ``mix = 0`` is the paper's one-hot target."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    onehot = F.one_hot(positive_index, teacher_scores.shape[1]).to(torch.float32)
    soft = (scale * teacher_scores.float()).masked_fill(~mask, float("-inf")).softmax(-1)
    return (1.0 - mix) * onehot + mix * soft


def generative_loss(model, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                    loss: str = "children", index: Optional[CodeIndex] = None, reduction: str = "mean",
                    teacher: Optional[tuple] = None) -> torch.Tensor:
    """eq. 7 for labels [B, L+1] (voken ids + EOS).

    ``loss="vocab"``: cross-entropy over the full vocabulary of the code and EOS; ``"children"``:
    the code's log-probabilities renormalised over ``index``'s children (the training gallery's
    prefix tree), EOS not scored. ``reduction="mean"``: per scored token (the usual LM loss);
    ``"sum"``: summed over a code's tokens, the scale of eq. 7 and of s_j (stage 2), then averaged
    over the batch. ``teacher`` = ``(teacher_sim [B, G], gallery_tokens [G, L], mix)`` mixes a
    teacher's soft target into the children loss (:func:`distilled_code_loss`).
    """
    if loss not in LOSS_MODES:
        raise ValueError(f"loss must be one of {LOSS_MODES}, got {loss!r}")
    enc = BaseModelOutput(last_hidden_state=encoder_hidden)
    if loss == "vocab":
        logits = model(encoder_outputs=enc, attention_mask=attention_mask, decoder_input_ids=_decoder_inputs(model, labels),
                       use_cache=False).logits
        lp = code_log_probs(logits, labels)
    else:
        if index is None:
            raise ValueError("loss='children' needs the training gallery's CodeIndex")
        codes = labels[:, :-1]
        logits = model(encoder_outputs=enc, attention_mask=attention_mask, decoder_input_ids=_decoder_inputs(model, codes),
                       use_cache=False).logits
        if teacher is not None:
            nll = distilled_code_loss(logits, codes, index, teacher[0], teacher[1], teacher[2])
            return nll.mean() if reduction == "mean" else nll.sum(1).mean()
        lp = code_log_probs(logits, codes, index)
    if teacher is not None:
        raise ValueError("a teacher's soft target needs loss='children'")
    return -lp.mean() if reduction == "mean" else -lp.sum(1).mean()


class RetrievalObjective(torch.nn.Module):
    """The training loss as one module, so DDP sees a single forward per step.

    Holds the seq2seq model and, when used, the query-feature prefix (avg.retriever.prefix): both
    are what gets saved. Stage 1 (no candidates): L_gen (eq. 7, per-token mean). Stage 2
    (candidates given, eq. 10): ``L_gen + lambda * L_dis`` sharing one encoder pass, with L_gen
    summed over the code's tokens (eq. 7 as written, the scale of s_j) and s_j scored like the
    search that found the candidates (``candidate_index``: the gallery searched). With
    ``gallery_tokens`` (the codes ``index`` was built from, as token ids) and ``gen_teacher_mix`` > 0,
    a forward given ``teacher_sim`` [B, G] mixes the teacher's soft target into L_gen
    (:func:`distilled_code_loss`); ``targets`` [B, b] replaces L_dis's one-hot target.
    """

    def __init__(self, model, *, dis_weight: float = 1.0, temperature: float = 1.0, loss: str = "vocab",
                 index: Optional[CodeIndex] = None, prefix=None, score_len: Optional[int] = None,
                 gallery_tokens: Optional[torch.Tensor] = None, gen_teacher_mix: float = 0.0):
        super().__init__()
        if loss not in LOSS_MODES:
            raise ValueError(f"loss must be one of {LOSS_MODES}, got {loss!r}")
        if gen_teacher_mix and (loss != "children" or gallery_tokens is None or index is None):
            raise ValueError("gen_teacher_mix needs loss='children', the training index and its gallery_tokens")
        self.model, self.prefix = model, prefix
        self.dis_weight, self.temperature = dis_weight, temperature
        self.loss, self.index, self.score_len = loss, index, score_len
        self.gallery_tokens, self.gen_teacher_mix = gallery_tokens, float(gen_teacher_mix)

    def forward(self, input_ids, attention_mask, labels, candidates=None, positive_index=None, candidate_mask=None,
                query_features=None, candidate_index=None, list_mask=None, targets=None, teacher_sim=None):
        inputs = prefixed_inputs(self.model, self.prefix, input_ids, attention_mask, query_features)
        if candidates is None and self.loss == "vocab":  # the plain HF LM loss (stage 1, paper setting)
            loss = self.model(**inputs, labels=labels, use_cache=False).loss
            return loss, {"gen": loss.detach()}
        hidden = self.model.get_encoder()(**inputs).last_hidden_state
        mask = inputs["attention_mask"]
        teacher = (teacher_sim, self.gallery_tokens, self.gen_teacher_mix) \
            if teacher_sim is not None and self.gen_teacher_mix > 0 else None
        if candidates is None:
            loss = generative_loss(self.model, hidden, mask, labels, loss=self.loss, index=self.index, teacher=teacher)
            return loss, {"gen": loss.detach()}
        gen = generative_loss(self.model, hidden, mask, labels, loss=self.loss, index=self.index, reduction="sum",
                              teacher=teacher)
        if list_mask is not None:
            # only the kept lists are scored: the others weigh nothing in L_dis (same loss and gradient as
            # scoring every list and masking), and their b teacher-forced candidates are most of a step's cost
            keep = list_mask.nonzero().flatten()
            if keep.numel() == 0:
                dis = gen.new_zeros(())
                return gen, {"gen": gen.detach(), "dis": dis}
            hidden, mask, candidates, positive_index = hidden[keep], mask[keep], candidates[keep], positive_index[keep]
            candidate_mask = candidate_mask[keep] if candidate_mask is not None else None
            targets = targets[keep] if targets is not None else None
        scores = candidate_log_probs(self.model, hidden, mask, candidates,
                                     index=candidate_index if self.loss == "children" else None, score_len=self.score_len)
        dis = discriminative_loss(scores, positive_index, temperature=self.temperature, mask=candidate_mask,
                                  targets=targets)
        return gen + self.dis_weight * dis, {"gen": gen.detach(), "dis": dis.detach()}


__all__ = ["LOSS_MODES", "build_candidates", "mine_candidates", "candidate_log_probs", "discriminative_loss",
           "distilled_code_loss", "generative_loss", "teacher_targets", "RetrievalObjective"]
