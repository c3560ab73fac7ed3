"""Stage-2 loss (eqs. 8-10) against a hand computation on a tiny T5."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from avg.objectives.retrieval import RetrievalObjective, candidate_log_probs, discriminative_loss


@pytest.fixture()
def tiny_t5():
    cfg = T5Config(vocab_size=30, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(cfg).eval()


@torch.no_grad()
def hand_scores(model, input_ids, mask, cands):
    """s_j by brute force: one teacher-forced pass per candidate, log-softmax, sum over positions."""
    B, b, L = cands.shape
    out = torch.zeros(B, b, dtype=torch.float64)
    for i in range(B):
        for j in range(b):
            code = cands[i, j]
            dec = torch.cat([torch.tensor([0]), code[:-1]])[None]
            logits = model(input_ids=input_ids[i:i + 1], attention_mask=mask[i:i + 1], decoder_input_ids=dec).logits[0]
            total = 0.0
            for t in range(L):
                row = logits[t].double()
                total += float(row[code[t]] - torch.logsumexp(row, 0))
            out[i, j] = total
    return out


def test_stage2_loss_matches_hand_computation(tiny_t5):
    model = tiny_t5
    input_ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    mask = (input_ids != 0).long()
    mask[0, :] = 1
    cands = torch.tensor([[[10, 11, 12], [10, 13, 12], [14, 11, 12]],
                          [[20, 21, 22], [20, 21, 23], [24, 25, 26]]])
    pos = torch.tensor([2, 0])
    labels = torch.cat([cands[torch.arange(2), pos], torch.ones(2, 1, dtype=torch.long)], dim=1)  # code + EOS
    s = hand_scores(model, input_ids, mask, cands)
    T, lam = 0.5, 0.3
    hand_dis = sum(-(float(s[i, pos[i]]) / T) + math.log(sum(math.exp(float(x) / T) for x in s[i])) for i in range(2)) / 2
    # L_gen by hand (eq. 7 as written, the scale of s_j): NLL of code + EOS summed over tokens, mean over queries
    nll, n = 0.0, 0
    for i in range(2):  # (no grad needed: float() below)
        dec = torch.cat([torch.tensor([0]), labels[i, :-1]])[None]
        logits = model(input_ids=input_ids[i:i + 1], attention_mask=mask[i:i + 1], decoder_input_ids=dec).logits[0].double().detach()
        for t in range(labels.shape[1]):
            nll += float(torch.logsumexp(logits[t], 0) - logits[t, labels[i, t]])
            n += 1
    hand_gen = nll / 2

    enc = model.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
    scores = candidate_log_probs(model, enc, mask, cands)
    assert torch.allclose(scores.double(), s, atol=1e-4)
    obj = RetrievalObjective(model, dis_weight=lam, temperature=T, loss="vocab")  # the paper's full-vocabulary score
    loss, parts = obj(input_ids, mask, labels, candidates=cands, positive_index=pos)
    assert float(parts["dis"]) == pytest.approx(hand_dis, abs=1e-4)
    assert float(parts["gen"]) == pytest.approx(hand_gen, abs=1e-4)
    assert float(loss.detach()) == pytest.approx(hand_gen + lam * hand_dis, abs=1e-4)
    # stage 1 (no candidates) is HF's own per-token LM loss
    loss1, _ = obj(input_ids, mask, labels)
    assert float(loss1.detach()) == pytest.approx(nll / n, abs=1e-4)
    # the gradient reaches the model through s_j
    model.zero_grad()
    discriminative_loss(candidate_log_probs(model, model.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state,
                                            mask, cands), pos).backward()
    assert model.shared.weight.grad is not None and model.shared.weight.grad.abs().sum() > 0


def test_list_mask_scores_only_kept_lists_with_the_same_loss_and_gradient(tiny_t5):
    """--dis-lists found: the objective scores only the kept lists; loss and gradient equal scoring every
    list and averaging L_dis over the kept ones (the naive form), and a batch with no kept list is L_gen alone."""
    model = tiny_t5
    input_ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0], [4, 7, 9, 1]])
    mask = (input_ids != 0).long()
    cands = torch.tensor([[[10, 11, 12], [10, 13, 12], [14, 11, 12]],
                          [[20, 21, 22], [20, 21, 23], [24, 25, 26]],
                          [[15, 16, 17], [15, 18, 17], [19, 16, 17]]])
    pos = torch.tensor([2, 0, 1])
    cmask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    labels = torch.cat([cands[torch.arange(3), pos], torch.ones(3, 1, dtype=torch.long)], dim=1)
    keep = torch.tensor([True, False, True])
    lam = 0.7
    obj = RetrievalObjective(model, dis_weight=lam, loss="vocab")

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, parts = obj(input_ids, mask, labels, candidates=cands, positive_index=pos, candidate_mask=cmask, list_mask=keep)
    got = grads(loss)
    # naive: every list scored, the dropped one masked out of the mean
    enc = model.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
    from avg.objectives.retrieval import generative_loss
    gen = generative_loss(model, enc, mask, labels, loss="vocab", reduction="sum")
    logits = candidate_log_probs(model, enc, mask, cands).masked_fill(~cmask, float("-inf"))
    per_list = torch.nn.functional.cross_entropy(logits, pos, reduction="none")
    dis = (per_list * keep.float()).sum() / keep.sum()
    want = grads(gen + lam * dis)
    assert float(parts["dis"]) == pytest.approx(float(dis), abs=1e-5)
    assert float(loss) == pytest.approx(float(gen + lam * dis), abs=1e-5)
    assert len(got) == len(want) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
    none, parts = obj(input_ids, mask, labels, candidates=cands, positive_index=pos, candidate_mask=cmask,
                      list_mask=torch.zeros(3, dtype=torch.bool))
    assert float(parts["dis"]) == 0.0 and float(none) == pytest.approx(float(parts["gen"]), abs=1e-6)


def test_discriminative_loss_is_cross_entropy_over_logits_with_mask():
    s = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.1, -9.0]])
    pos = torch.tensor([0, 1])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    got = discriminative_loss(s, pos, temperature=2.0, mask=mask)
    row0 = -(-1.0 / 2) + math.log(sum(math.exp(x / 2) for x in (-1.0, -2.0, -3.0)))
    row1 = -(-0.1 / 2) + math.log(sum(math.exp(x / 2) for x in (-0.5, -0.1)))  # masked slot takes no mass
    assert float(got) == pytest.approx((row0 + row1) / 2, abs=1e-6)
    # over logits, not softmaxed values: shifting all scores of a row leaves the loss unchanged
    assert float(discriminative_loss(s + 5.0, pos, temperature=2.0, mask=mask)) == pytest.approx(float(got), abs=1e-5)


def test_mine_candidates_is_the_search_plus_the_positive_and_restores_train_mode(tiny_t5):
    """eq. 8 in one call: the beam's codes in the gallery, the positive put in where the beam missed it
    (build_candidates with the same generator), searched in eval mode whatever the model's mode."""
    from avg.search.code_index import CodeIndex
    from avg.objectives.retrieval import build_candidates, mine_candidates
    from avg.search.beam import constrained_beam_search

    codes = torch.tensor([[5, 7, 9], [5, 8, 9], [6, 7, 10], [6, 8, 9], [5, 7, 10]])
    index = CodeIndex.from_codes(codes, 30)
    ids = torch.tensor([[3, 4, 1], [11, 12, 1]])
    mask = torch.ones_like(ids)
    positive = torch.stack([codes[0], codes[3]])
    model = tiny_t5.train()
    got = mine_candidates(model, None, ids, mask, None, index, 2, positive, eos_token_id=1,
                          generator=torch.Generator().manual_seed(3))
    assert model.training  # restored
    ref = constrained_beam_search(model.eval(), ids, mask, index, 2, decoder_start_token_id=0, eos_token_id=1,
                                  normalize="children")
    cands, cmask, pidx = build_candidates(ref.sequences, ref.num_valid, positive, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got[0], cands) and torch.equal(got[1], cmask) and torch.equal(got[2], pidx)
    found = (ref.sequences == positive[:, None, :]).all(-1).any(-1)
    assert torch.equal(got[3], found)
    assert all(torch.equal(got[0][i, int(got[2][i])], positive[i]) for i in range(2))
