"""Stage-2 losses: listwise discrimination over the model's own beam candidates (eqs. 8-10).

Pure functions over an encoder-decoder model: no I/O, no optimiser, no global RNG (the positive's
replacement slot comes from an explicit ``torch.Generator``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput


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


def candidate_log_probs(model, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor,
                        candidates: torch.Tensor) -> torch.Tensor:
    """s_j: the sum of the candidate's voken log-probabilities, teacher-forced, WITH gradient.

    encoder_hidden [B, S, H] (the encoder run once per query), candidates [B, b, L] token ids ->
    scores [B, b]. The log-probabilities are over the full vocabulary (the model's own
    distribution), summed over the L voken positions (no EOS: the search scores codes alike).
    """
    B, b, L = candidates.shape
    flat = candidates.reshape(B * b, L)
    start = model.config.decoder_start_token_id
    dec_in = torch.cat([torch.full((B * b, 1), start, dtype=flat.dtype, device=flat.device), flat[:, :-1]], dim=1)
    hidden = encoder_hidden.repeat_interleave(b, dim=0)
    mask = attention_mask.repeat_interleave(b, dim=0)
    out = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask, decoder_input_ids=dec_in, use_cache=False)
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    return logp.gather(-1, flat.unsqueeze(-1)).squeeze(-1).sum(-1).view(B, b)


def discriminative_loss(scores: torch.Tensor, positive_index: torch.Tensor, *, temperature: float = 1.0,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """eq. 9: -log softmax(s / T)[positive], a cross-entropy over the candidates' logits.

    Empty slots (mask False) get -inf so they take no probability mass.
    """
    logits = scores / temperature
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return F.cross_entropy(logits, positive_index)


def stage2_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                candidates: torch.Tensor, positive_index: torch.Tensor, *, candidate_mask: Optional[torch.Tensor] = None,
                dis_weight: float = 1.0, temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
    """eq. 10: L = L_gen (eq. 7) + lambda * L_dis (eq. 9), sharing one encoder pass.

    labels [B, L+1] = voken ids + EOS; candidates [B, b, L]. Returns (loss, {"gen", "dis"} detached).
    """
    encoder = model.get_encoder()
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    gen = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=attention_mask, labels=labels, use_cache=False).loss
    scores = candidate_log_probs(model, hidden, attention_mask, candidates)
    dis = discriminative_loss(scores, positive_index, temperature=temperature, mask=candidate_mask)
    loss = gen + dis_weight * dis
    return loss, {"gen": gen.detach(), "dis": dis.detach()}


class RetrievalObjective(torch.nn.Module):
    """The training loss as one module, so DDP sees a single forward per step.

    Stage 1 (no candidates): L_gen (eq. 7). Stage 2: `stage2_loss` (eq. 10). The module owns no
    parameters of its own: it holds the seq2seq model, which is what gets saved.
    """

    def __init__(self, model, *, dis_weight: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.model, self.dis_weight, self.temperature = model, dis_weight, temperature

    def forward(self, input_ids, attention_mask, labels, candidates=None, positive_index=None, candidate_mask=None):
        if candidates is None:
            loss = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
            return loss, {"gen": loss.detach()}
        return stage2_loss(self.model, input_ids, attention_mask, labels, candidates, positive_index,
                           candidate_mask=candidate_mask, dis_weight=self.dis_weight, temperature=self.temperature)


__all__ = ["build_candidates", "candidate_log_probs", "discriminative_loss", "stage2_loss", "RetrievalObjective"]
