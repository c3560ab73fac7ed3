"""One score for a code everywhere: the children-renormalised search, loss, s_j and diagnostics
against naive computations; soft-prefix inputs; per-level voken tokens; chunked galleries."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avg.search.code_index import CodeIndex, code_log_probs
from avg.objectives.retrieval import (RetrievalObjective, candidate_log_probs, discriminative_loss,
                                  generative_loss)
from avg.retriever.prefix import QueryPrefix, feature_rows, load_prefix, prefixed_inputs, save_prefix
from avg.search.beam import constrained_beam_search
from avg.core.io import InputError
from test_search import EOS, VOKENS, gallery, one_thread, queries, tiny_llama, tiny_t5  # noqa: F401 (autouse fixture)


def naive_children_score(model, ids, mask, code, codes, evidence=()):
    """sum_t [logit(c_t) - logsumexp(logits of the tokens that follow c_<t in `codes`)], one pass per step;
    at the ``evidence`` positions over every token any code has there, from the first step (no voken read)."""
    total = 0.0
    for t in range(len(code)):
        prefix = code[:t]
        allowed = sorted({int(c[t]) for c in codes if t in evidence or list(c[:t]) == list(prefix)})
        dec = torch.tensor([[0] + ([] if t in evidence else [int(x) for x in prefix])])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[0, -1].double()
        total += float(logits[int(code[t])] - torch.logsumexp(logits[allowed], 0))
    return total


def assert_search_is_naive(out, fast, i: int, naive: dict) -> None:
    """Query ``i`` of an exhaustive search returned every code with its naive score, and the fast path the same."""
    got = {tuple(c.tolist()): float(s) for c, s in zip(out.sequences[i], out.scores[i])}
    assert set(got) == set(naive)
    for c, v in naive.items():
        assert got[c] == pytest.approx(v, abs=1e-4)
    assert torch.equal(out.sequences[i], fast.sequences[i])
    torch.testing.assert_close(out.scores[i], fast.scores[i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed,num_codes,code_len,alphabet", [(0, 12, 3, 4), (1, 30, 4, 3), (2, 1, 3, 8)])
def test_children_search_is_exhaustive_renormalised_ranking(seed, num_codes, code_len, alphabet):
    model = tiny_t5(seed)
    codes = torch.unique(gallery(seed, num_codes, code_len, alphabet), dim=0)
    ids, mask = queries(seed, n=2)
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    out = constrained_beam_search(model, ids, mask, index, index.num_codes, normalize="children")
    fast = constrained_beam_search(model, ids, mask, index, index.num_codes, normalize="children", voken_ids=VOKENS,
                                   eos_token_id=EOS)  # EOS is ignored: after a full code it is the only continuation
    for i in range(2):
        naive = {tuple(c.tolist()): naive_children_score(model, ids[i:i + 1], mask[i:i + 1], c.tolist(), codes.tolist())
                 for c in codes}
        assert_search_is_naive(out, fast, i, naive)
        # scores are log-probabilities of a distribution over the gallery's codes
        assert math.fsum(math.exp(s) for s in naive.values()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("seed,num_codes,code_len,alphabet,evidence", [(0, 40, 3, 6, (2,)), (1, 30, 4, 3, (1, 3))])
def test_evidence_levels_score_over_the_level_alphabet_in_search_and_loss(seed, num_codes, code_len, alphabet, evidence):
    """At an evidence depth a voken is scored from the first step's logits over the level's whole alphabet:
    the exhaustive search, its fast path and the teacher-forced code_log_probs all give the naive score;
    a code alone under its prefix still gets the caption's evidence for its last voken (not log 1 = 0)."""
    model = tiny_t5(seed)
    codes = torch.unique(gallery(seed, num_codes, code_len, alphabet), dim=0)
    ids, mask = queries(seed, n=2)
    index = CodeIndex.from_codes(codes, model.config.vocab_size, evidence_depths=evidence)
    assert index.to("cpu").evidence_depths == evidence and "evidence_depths" in repr(index)
    out = constrained_beam_search(model, ids, mask, index, index.num_codes, normalize="children")
    fast = constrained_beam_search(model, ids, mask, index, index.num_codes, normalize="children", voken_ids=VOKENS)
    plain = constrained_beam_search(model, ids, mask, CodeIndex.from_codes(codes, model.config.vocab_size),
                                    index.num_codes, normalize="children")
    dec = torch.cat([torch.zeros(codes.shape[0], 1, dtype=torch.long), codes[:, :-1]], 1)
    for i in range(2):
        naive = {tuple(c.tolist()): naive_children_score(model, ids[i:i + 1], mask[i:i + 1], c.tolist(), codes.tolist(),
                                                         evidence) for c in codes}
        assert_search_is_naive(out, fast, i, naive)
        assert not torch.allclose(out.scores[i].sort().values, plain.scores[i].sort().values)
        with torch.no_grad():
            logits = model(input_ids=ids[i:i + 1].expand(codes.shape[0], -1),
                           attention_mask=mask[i:i + 1].expand(codes.shape[0], -1), decoder_input_ids=dec).logits
        tf = code_log_probs(logits, codes, index).sum(1)
        for c, v in zip(codes, tf):
            assert float(v) == pytest.approx(naive[tuple(c.tolist())], abs=1e-4)


def test_code_log_probs_evidence_level_by_hand():
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 10)
    codes = torch.tensor([[3, 4], [3, 5], [6, 7]])
    index = CodeIndex.from_codes(codes, 10, evidence_depths=[1])
    got = code_log_probs(logits, torch.tensor([[3, 5], [6, 7]]), index)
    # position 1 is scored by step 0 over {4, 5, 7} whatever the prefix: [6, 7] is alone under 6 and still gets
    # its evidence
    torch.testing.assert_close(got[:, 1], torch.stack([logits[0, 0, 5] - torch.logsumexp(logits[0, 0, [4, 5, 7]], 0),
                                                      logits[1, 0, 7] - torch.logsumexp(logits[1, 0, [4, 5, 7]], 0)]))
    torch.testing.assert_close(got[:, 0], code_log_probs(logits, torch.tensor([[3, 5], [6, 7]]), CodeIndex.from_codes(codes, 10))[:, 0])
    with pytest.raises(ValueError, match="evidence_depths"):
        CodeIndex.from_codes(codes, 10, evidence_depths=[2])


def test_children_normalisation_needs_an_index():
    model = tiny_t5(0)
    ids, mask = queries(0)
    with pytest.raises(ValueError, match="needs an index"):
        constrained_beam_search(model, ids, mask, None, 3, code_len=2, normalize="children")
    with pytest.raises(ValueError, match="normalize must be"):
        constrained_beam_search(model, ids, mask, None, 3, code_len=2, normalize="softmax")


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_inputs_embeds_equal_input_ids(kind):
    model = tiny_t5(3) if kind == "t5" else tiny_llama(3)
    codes = gallery(3, 40, 3, 5)
    ids, mask = queries(3, left_pad=kind == "llama")
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    a = constrained_beam_search(model, ids, mask, index, 6, eos_token_id=EOS)
    embeds = model.get_input_embeddings()(ids)
    b = constrained_beam_search(model, None, mask, index, 6, eos_token_id=EOS, inputs_embeds=embeds)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)


def test_code_log_probs_children_and_vocab_against_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 10)
    codes = torch.tensor([[3, 4], [3, 5], [6, 4]])
    index = CodeIndex.from_codes(codes, 10)
    targets = torch.tensor([[3, 5], [6, 4]])
    got = code_log_probs(logits, targets, index)
    # row 0: step 0 allowed {3, 6}; step 1 after 3: {4, 5}.  row 1: {3, 6}, then after 6: {4}
    exp = torch.tensor([
        [logits[0, 0, 3] - torch.logsumexp(logits[0, 0, [3, 6]], 0), logits[0, 1, 5] - torch.logsumexp(logits[0, 1, [4, 5]], 0)],
        [logits[1, 0, 6] - torch.logsumexp(logits[1, 0, [3, 6]], 0), torch.tensor(0.0)],
    ])
    torch.testing.assert_close(got, exp)
    torch.testing.assert_close(code_log_probs(logits, targets), logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0])
    with pytest.raises(ValueError, match="not a code of the index"):
        code_log_probs(logits, torch.tensor([[6, 5]]).expand(2, 2), index)


def test_generative_loss_children_is_mean_negative_children_log_prob(tmp_path):
    model = tiny_t5(4).train(False)
    codes = torch.unique(gallery(4, 20, 3, 4), dim=0)
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    ids, mask = queries(4, n=2)
    labels = torch.cat([codes[:2], torch.full((2, 1), EOS)], 1)
    hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    got = generative_loss(model, hidden, mask, labels, loss="children", index=index)
    naive = [naive_children_score(model, ids[i:i + 1], mask[i:i + 1], codes[i].tolist(), codes.tolist()) for i in range(2)]
    assert float(got) == pytest.approx(-sum(naive) / 6, abs=1e-4)  # per scored token: 2 codes x 3 positions
    summed = generative_loss(model, hidden, mask, labels, loss="children", index=index, reduction="sum")
    assert float(summed) == pytest.approx(-sum(naive) / 2, abs=1e-4)
    # the vocab loss is HF's own LM loss on code + EOS
    hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert float(generative_loss(model, hidden, mask, labels, loss="vocab")) == pytest.approx(float(hf), abs=1e-5)
    # s_j scored over the index equals the search's score
    s = candidate_log_probs(model, hidden, mask, codes[:2][:, None, :].expand(2, 1, 3).contiguous(), index=index)
    assert [float(x) for x in s[:, 0]] == pytest.approx(naive, abs=1e-4)


def test_stage2_objective_scores_candidates_in_their_gallery_and_masks_lists():
    model = tiny_t5(5)
    codes = torch.unique(gallery(5, 30, 3, 4), dim=0)
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    chunk = CodeIndex.from_codes(codes[:8], model.config.vocab_size)
    ids, mask = queries(5, n=2)
    cands = torch.stack([codes[:4], codes[4:8]])
    labels = torch.cat([torch.stack([codes[1], codes[6]]), torch.full((2, 1), EOS)], 1)
    pos = torch.tensor([1, 2])
    obj = RetrievalObjective(model, loss="children", index=index, dis_weight=0.5, temperature=2.0)
    loss, parts = obj(ids, mask, labels, candidates=cands, positive_index=pos, candidate_index=chunk)
    hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    s = candidate_log_probs(model, hidden, mask, cands, index=chunk)
    dis = discriminative_loss(s, pos, temperature=2.0)
    gen = generative_loss(model, hidden, mask, labels, loss="children", index=index, reduction="sum")
    assert float(parts["dis"]) == pytest.approx(float(dis), abs=1e-5)
    assert float(loss) == pytest.approx(float(gen + 0.5 * dis), abs=1e-4)
    # only the lists kept by list_mask count (scored against the same chunk)
    _, one = obj(ids, mask, labels, candidates=cands, positive_index=pos, candidate_index=chunk,
                 list_mask=torch.tensor([False, True]))
    assert float(one["dis"]) == pytest.approx(float(torch.nn.functional.cross_entropy(s[1:] / 2.0, pos[1:])), abs=1e-5)


def test_query_prefix_inputs_and_round_trip(tmp_path):
    model = tiny_t5(6)
    prefix = QueryPrefix(8, model.config.d_model, 3)
    ids, mask = queries(6, n=3)
    feats = torch.randn(3, 8)
    inp = prefixed_inputs(model, prefix, ids, mask, feats)
    assert inp["inputs_embeds"].shape == (3, ids.shape[1] + 3, model.config.d_model)
    assert torch.equal(inp["attention_mask"][:, :3], torch.ones(3, 3, dtype=mask.dtype))
    assert torch.equal(inp["attention_mask"][:, 3:], mask)
    torch.testing.assert_close(inp["inputs_embeds"][:, 3:], model.get_input_embeddings()(ids))
    assert prefixed_inputs(model, None, ids, mask, None) == {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(ValueError, match="query-feature prefix"):
        prefixed_inputs(model, prefix, ids, mask, None)
    save_prefix(prefix, tmp_path, encoder={"model": "x"})
    loaded, cfg = load_prefix(tmp_path)
    assert cfg["num_tokens"] == 3 and cfg["encoder"] == {"model": "x"}
    torch.testing.assert_close(loaded(feats), prefix(feats))
    assert load_prefix(tmp_path / "none") == (None, {})
    # a prefix model searches with embeddings: same ranking as its own teacher-forced scores
    codes = torch.unique(gallery(6, 10, 2, 4), dim=0)
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    out = constrained_beam_search(model, None, inp["attention_mask"], index, index.num_codes, normalize="children",
                                  inputs_embeds=inp["inputs_embeds"].detach())
    assert out.num_valid.tolist() == [index.num_codes] * 3


def test_feature_rows_name_the_record():
    rows = feature_rows([{"query": "a", "text_row": 2}, {"query": "b", "text_row": 0}], 5, "x.jsonl")
    assert rows.tolist() == [2, 0]
    with pytest.raises(InputError, match=r"x.jsonl: record 2 \('b'\) has no CLIP text feature"):
        feature_rows([{"query": "a", "text_row": 2}, {"query": "b", "text_row": None}], 5, "x.jsonl")
    with pytest.raises(InputError, match="record 1"):
        feature_rows([{"query": "a", "text_row": 9}], 5, "x.jsonl")


def test_level_tokens_give_each_level_its_own_rows_from_the_shared_codebook():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from avg.retriever.vocab import VokenVocab

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    model = tiny_t5(7)
    book = np.random.default_rng(0).normal(size=(1, 4, 32)).astype(np.float32)
    vocab = VokenVocab(num_levels=2, codebook_size=4, shared_codebook=True, level_tokens=True)
    vocab.add_to(tok, model, book)
    assert vocab.position_tokens()[1][3] == "<v1_3>" and len(vocab.tokens()) == 8
    emb = model.get_input_embeddings().weight
    ids = vocab.code_to_token_ids([[3, 3]])[0]
    assert ids[0] != ids[1]
    torch.testing.assert_close(emb[ids[0]], emb[ids[1]])  # same codebook entry -> same starting row
    again = VokenVocab.from_meta(vocab.to_dict())
    assert again.level_tokens and again.position_tokens() == vocab.position_tokens()
    shared = VokenVocab(num_levels=2, codebook_size=4, shared_codebook=True)
    assert shared.position_tokens()[1][3] == "<v_3>"


def test_gallery_chunks_and_grouped_batches():
    from avg.train.batches import EpochBatchSampler
    from avg.search.gallery import Gallery

    g = Gallery([f"i{k}" for k in range(23)], np.arange(23 * 2).reshape(23, 2))
    chunks = g.chunks(10, seed=1)
    assert [len(c) for c in chunks] == [10, 13]  # the last 3 images are merged into the chunk before
    assert sorted(i for c in chunks for i in c.image_ids) == sorted(g.image_ids)
    assert g.chunks(0, 1) == [g] and g.chunks(50, 1) == [g]
    groups = np.array([k % 3 for k in range(40)])
    s = EpochBatchSampler(40, 6, seed=0, groups=groups)
    batches = list(s)
    assert all(len({int(groups[i]) for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(40))
    s.set_epoch(1)
    assert list(s) != batches  # reshuffled every epoch, reproducibly
    assert list(EpochBatchSampler(40, 6, seed=0, groups=groups)) == batches
