"""The CLIP teacher of the retriever's losses (avg.retriever.teacher, --gen-teacher-mix / --dis-teacher-mix)
against hand computations: the soft per-position target, the list targets, the code scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from avg.search.code_index import CodeIndex, code_log_probs
from avg.search.gallery import Gallery
from avg.objectives.retrieval import (RetrievalObjective, discriminative_loss, distilled_code_loss,
                                  generative_loss, teacher_targets)
from avg.retriever.teacher import CodeTeacher, GalleryTeacher
from avg.core.io import InputError
from test_search import EOS, gallery, one_thread, queries, tiny_t5  # noqa: F401 (autouse fixture)

# 5 gallery images over tokens 3..6; images 0 and 1 share a code
GALLERY = torch.tensor([[3, 5], [3, 5], [3, 6], [4, 5], [4, 6]])


def naive_distilled(logits, targets, codes, sim, mix):
    """Per position, over the children of the gold prefix: (1-mix) * -log p(gold) + mix * CE(q, p), q from
    sum_i exp(sim_i) over the images under each child, all by brute force in float64."""
    n, length = targets.shape
    out = torch.zeros(n, length, dtype=torch.float64)
    for r in range(n):
        for t in range(length):
            prefix = targets[r, :t].tolist()
            under = [i for i, c in enumerate(codes.tolist()) if c[:t] == prefix]
            kids = sorted({codes[i, t].item() for i in under})
            lp = logits[r, t, kids].double().log_softmax(0)
            mass = torch.tensor([sum(float(torch.exp(sim[r, i].double())) for i in under if codes[i, t] == k)
                                 for k in kids], dtype=torch.float64)
            q = mass / mass.sum()
            gold = kids.index(int(targets[r, t]))
            out[r, t] = (1 - mix) * -lp[gold] + mix * -(q * lp).sum()
    return out


@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_distilled_code_loss_equals_brute_force(mix):
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 9)
    sim = 3 * torch.randn(3, len(GALLERY))
    index = CodeIndex.from_codes(torch.unique(GALLERY, dim=0), 9)
    targets = torch.tensor([[3, 5], [4, 6], [3, 6]])
    got = distilled_code_loss(logits, targets, index, sim, GALLERY, mix)
    torch.testing.assert_close(got.double(), naive_distilled(logits, targets, GALLERY, sim, mix), atol=1e-5, rtol=1e-5)
    if mix == 0.0:  # the plain children loss
        torch.testing.assert_close(got, -code_log_probs(logits, targets, index))


def test_distilled_code_loss_is_safe_at_any_scale_and_checks_its_inputs():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 9)
    index = CodeIndex.from_codes(torch.unique(GALLERY, dim=0), 9)
    targets = torch.tensor([[3, 5]])
    sim = torch.tensor([[0.1, 0.2, 0.9, 0.0, 0.3]]) * 1e4  # exp() of these overflows in float32
    got = distilled_code_loss(logits, targets, index, sim, GALLERY, 1.0)
    assert torch.isfinite(got).all()
    # the teacher's mass is all on image 2's code [3, 6]: q is one-hot on 3, then on 6
    lp0 = logits[0, 0, [3, 4]].log_softmax(0)[0]
    lp1 = logits[0, 1, [5, 6]].log_softmax(0)[1]
    torch.testing.assert_close(got[0], -torch.stack([lp0, lp1]))
    with pytest.raises(ValueError, match="do not match"):
        distilled_code_loss(logits, targets, index, sim[:, :4], GALLERY, 1.0)
    with pytest.raises(ValueError, match="not a code of the index"):
        distilled_code_loss(logits, torch.tensor([[4, 4]]), index, sim, GALLERY, 1.0)


def test_generative_loss_with_a_teacher_through_the_objective():
    model = tiny_t5(4).train(False)
    codes = torch.unique(gallery(4, 20, 3, 4), dim=0)
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    ids, mask = queries(4, n=2)
    labels = torch.cat([codes[:2], torch.full((2, 1), EOS)], 1)
    sim = torch.randn(2, len(codes))
    hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    plain = generative_loss(model, hidden, mask, labels, loss="children", index=index)
    assert float(generative_loss(model, hidden, mask, labels, loss="children", index=index,
                                 teacher=(sim, codes, 0.0))) == pytest.approx(float(plain), abs=1e-6)
    with_teacher = generative_loss(model, hidden, mask, labels, loss="children", index=index, teacher=(sim, codes, 0.5))
    obj = RetrievalObjective(model, loss="children", index=index, gallery_tokens=codes, gen_teacher_mix=0.5)
    loss, _ = obj(ids, mask, labels, teacher_sim=sim)
    assert float(loss) == pytest.approx(float(with_teacher), abs=1e-5) and float(loss) != pytest.approx(float(plain))
    loss.backward()  # the teacher's side carries no gradient; the model's does
    assert model.shared.weight.grad is not None
    with pytest.raises(ValueError, match="needs loss='children'"):
        generative_loss(model, hidden, mask, labels, loss="vocab", teacher=(sim, codes, 0.5))
    with pytest.raises(ValueError, match="gen_teacher_mix needs"):
        RetrievalObjective(model, loss="vocab", gen_teacher_mix=0.5)


def test_teacher_targets_and_soft_discriminative_loss():
    cos = torch.tensor([[0.9, 0.1, 0.5, 0.0], [0.2, 0.4, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    pos = torch.tensor([1, 0])
    hard = teacher_targets(cos, pos, mask, mix=0.0, scale=10.0)
    assert torch.equal(hard, torch.nn.functional.one_hot(pos, 4).float())
    soft = teacher_targets(cos, pos, mask, mix=0.4, scale=10.0)
    torch.testing.assert_close(soft.sum(1), torch.ones(2))
    assert float(soft[1, 2:].abs().sum()) == 0.0  # empty slots get nothing
    expect = 0.6 * torch.tensor([1.0, 0.0]) + 0.4 * torch.softmax(torch.tensor([2.0, 4.0]), 0)
    torch.testing.assert_close(soft[1, :2], expect)
    scores = torch.randn(2, 4)
    # a one-hot target is the paper's cross-entropy; a soft one is -sum q log p over the real slots
    torch.testing.assert_close(discriminative_loss(scores, pos, mask=mask, targets=hard),
                               discriminative_loss(scores, pos, mask=mask))
    logp = scores.masked_fill(~mask, float("-inf")).log_softmax(1)
    naive = -(soft * logp.masked_fill(~mask, 0.0)).sum(1).mean()
    torch.testing.assert_close(discriminative_loss(scores, pos, mask=mask, targets=soft), naive)
    with pytest.raises(ValueError, match="mix must be"):
        teacher_targets(cos, pos, mask, mix=1.5, scale=1.0)


class _Vocab:
    """Codes are token ids shifted by 10 (what VokenVocab.code_to_token_ids does, in miniature)."""
    def code_to_token_ids(self, codes):
        return torch.as_tensor(np.asarray(codes), dtype=torch.long) + 10


def test_code_teacher_scores_a_code_by_its_best_image_and_names_bad_inputs():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(6, 4)).astype(np.float32)
    ids = ["a", "b", "c", "d"]
    chunk = Gallery(ids, [[0, 1], [0, 1], [1, 0], [1, 1]], name="chunk0")
    rows = {"a": 5, "b": 2, "c": 0, "d": 3}
    teacher = CodeTeacher(feats, rows, [chunk], _Vocab())
    q = torch.from_numpy(rng.normal(size=(2, 4)).astype(np.float32))
    cands = torch.tensor([[[10, 11], [11, 10]], [[11, 11], [10, 11]]])
    got = teacher.scores(0, cands, q)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    qn = q.numpy() / np.linalg.norm(q.numpy(), axis=1, keepdims=True)
    cos = lambda i, r: float(qn[i] @ unit[r])  # noqa: E731
    expect = [[max(cos(0, 5), cos(0, 2)), cos(0, 0)], [cos(1, 3), max(cos(1, 5), cos(1, 2))]]
    np.testing.assert_allclose(got.numpy(), expect, atol=1e-6)
    with pytest.raises(ValueError, match="not a code of chunk 0"):
        teacher.scores(0, torch.tensor([[[12, 12]]]), q[:1])
    with pytest.raises(InputError, match="chunk0: image 'd'"):
        CodeTeacher(feats, {"a": 5, "b": 2, "c": 0}, [chunk], _Vocab())
    gt = GalleryTeacher(feats, rows, chunk, _Vocab(), scale=20.0)
    np.testing.assert_allclose(gt.similarity(q).numpy(), 20.0 * qn @ unit[[5, 2, 0, 3]].T, atol=1e-5)
    assert torch.equal(gt.tokens, torch.tensor([[10, 11], [10, 11], [11, 10], [11, 11]]))
