"""constrained_beam_search against HF generate + a dict trie, brute force, and itself."""
import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from avg.search.code_index import CodeIndex, DictTrie
from avg.search.beam import constrained_beam_search

BASE_VOCAB, NUM_VOKENS, EOS = 100, 32, 1
VOKENS = torch.arange(BASE_VOCAB, BASE_VOCAB + NUM_VOKENS)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on shared cores extra threads only spin."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=BASE_VOCAB + NUM_VOKENS, d_model=32, d_ff=64, d_kv=8, num_layers=2,
                   num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=BASE_VOCAB + NUM_VOKENS, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=EOS, bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def gallery(seed, num_codes, code_len, alphabet):
    g = torch.Generator().manual_seed(seed)
    return BASE_VOCAB + torch.randint(0, alphabet, (num_codes, code_len), generator=g)


def queries(seed, n=3, max_len=8, left_pad=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, BASE_VOCAB, (n, max_len), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, n):  # every query after the first is shorter: padded
        pad = int(torch.randint(1, max_len - 2, (1,), generator=g))
        if left_pad:
            ids[i, :pad], mask[i, :pad] = 0, 0
        else:
            ids[i, max_len - pad:], mask[i, max_len - pad:] = 0, 0
    return ids, mask


def hf_ranked(model, ids, mask, codes, num_beams, eos, prompt_len, length_penalty=0.0, early_stopping=False):
    """HF beam search over a dict trie: the legit beams per query (HF pads with ~-1e9 copies)."""
    trie = DictTrie(codes.tolist())
    code_len = codes.shape[1]
    out = model.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams, num_return_sequences=num_beams,
                         do_sample=False, max_new_tokens=code_len + (eos is not None),
                         prefix_allowed_tokens_fn=trie.prefix_allowed_tokens_fn(prompt_len, eos),
                         length_penalty=length_penalty, early_stopping=early_stopping,
                         output_scores=True, return_dict_in_generate=True)
    seqs = out.sequences.view(ids.shape[0], num_beams, -1)[:, :, prompt_len:prompt_len + code_len]
    if num_beams == 1:  # HF runs greedy search: no sequence scores, the caller recomputes them
        return [(seqs[i], None) for i in range(ids.shape[0])]
    scores = out.sequences_scores.view(ids.shape[0], num_beams)
    return [(seqs[i][scores[i] > -1e8], scores[i][scores[i] > -1e8]) for i in range(ids.shape[0])]


def teacher_forced(model, ids, mask, codes, eos, subset=None):
    """log p(code (+ EOS) | query) for every query x code, by one full forward pass (T5)."""
    n, g = ids.shape[0], codes.shape[0]
    target = codes if eos is None else torch.cat([codes, torch.full((g, 1), eos)], 1)
    dec_in = torch.cat([torch.zeros(g, 1, dtype=torch.long), target[:, :-1]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids.repeat_interleave(g, 0), attention_mask=mask.repeat_interleave(g, 0),
                       decoder_input_ids=dec_in.repeat(n, 1)).logits.float()
    if subset is not None:  # renormalise over the subset, as the fast path does
        logits = torch.full_like(logits, float("-inf")).index_copy(2, subset, logits.index_select(2, subset))
    lp = logits.log_softmax(-1).gather(2, target.repeat(n, 1)[..., None]).squeeze(-1)
    return lp.sum(1).view(n, g)


# (seed, num_codes, code_len, alphabet, num_beams, eos): shared prefixes (small alphabets), a
# gallery of one code, galleries smaller than the beam, beam 1.
EQ_CASES = [
    (0, 1, 4, 32, 5, None), (1, 1, 3, 32, 4, EOS), (2, 3, 4, 32, 8, EOS), (3, 5, 3, 2, 10, None),
    (4, 40, 4, 3, 6, EOS), (5, 40, 4, 3, 6, None), (6, 200, 4, 32, 12, EOS), (7, 200, 5, 4, 7, None),
    (8, 60, 2, 32, 1, EOS), (9, 500, 3, 32, 20, None), (10, 12, 4, 2, 12, EOS), (11, 300, 4, 8, 3, EOS),
]


@pytest.mark.parametrize("seed,num_codes,code_len,alphabet,num_beams,eos", EQ_CASES)
def test_t5_equals_hf_generate(seed, num_codes, code_len, alphabet, num_beams, eos):
    model = tiny_t5(seed)
    codes = gallery(seed, num_codes, code_len, alphabet)
    ids, mask = queries(seed)
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    out = constrained_beam_search(model, ids, mask, index, num_beams, eos_token_id=eos)
    k = min(num_beams, index.num_codes)
    assert out.sequences.shape == (3, k, code_len) and out.scores.shape == (3, k)
    assert out.num_valid.tolist() == [k] * 3
    for i, (hf_seqs, hf_scores) in enumerate(hf_ranked(model, ids, mask, codes, num_beams, eos, prompt_len=1)):
        assert hf_seqs.shape[0] == k
        assert torch.equal(out.sequences[i], hf_seqs)
        if hf_scores is None:
            hf_scores = teacher_forced(model, ids[i:i + 1], mask[i:i + 1], hf_seqs, eos)[0]
        torch.testing.assert_close(out.scores[i], hf_scores, rtol=0, atol=1e-5)


def test_length_penalty_and_early_stopping_do_not_change_ranking():
    model = tiny_t5(3)
    codes = gallery(3, 80, 4, 6)
    ids, mask = queries(3)
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    out = constrained_beam_search(model, ids, mask, index, 9, eos_token_id=EOS)
    for lp, es in [(1.0, True), (2.0, "never")]:
        for i, (hf_seqs, hf_scores) in enumerate(hf_ranked(model, ids, mask, codes, 9, EOS, 1, lp, es)):
            assert torch.equal(out.sequences[i], hf_seqs)
            torch.testing.assert_close(out.scores[i], hf_scores * 5 ** lp, rtol=1e-5, atol=1e-4)


def test_index_backed_prefix_fn_matches_dict_trie_in_generate():
    model = tiny_t5(1)
    codes = gallery(1, 50, 3, 5)
    ids, mask = queries(1)
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    kw = dict(num_beams=6, num_return_sequences=6, max_new_tokens=4, do_sample=False)
    a = model.generate(ids, attention_mask=mask, prefix_allowed_tokens_fn=index.prefix_allowed_tokens_fn(1, EOS), **kw)
    trie_fn = DictTrie(codes.tolist()).prefix_allowed_tokens_fn(1, EOS)
    b = model.generate(ids, attention_mask=mask, prefix_allowed_tokens_fn=trie_fn, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("eos", [None, EOS])
def test_exhaustive_when_gallery_fits_in_beam(eos):
    """With num_beams >= gallery size nothing is pruned: the result is the exact ranking."""
    model = tiny_t5(7)
    codes = torch.unique(gallery(7, 10, 3, 32), dim=0)
    ids, mask = queries(7)
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    out = constrained_beam_search(model, ids, mask, index, 16, eos_token_id=eos)
    assert out.num_valid.tolist() == [codes.shape[0]] * 3
    exact = teacher_forced(model, ids, mask, codes, eos)
    for i in range(3):
        order = exact[i].argsort(descending=True)
        assert torch.equal(out.sequences[i], codes[order])
        torch.testing.assert_close(out.scores[i], exact[i][order], rtol=0, atol=1e-4)


def test_fast_path_renormalises_over_vokens():
    """Fast-path scores are log-probs renormalised over vokens (+EOS); rankings can differ from the
    full-vocabulary ones, and where they do the fast path follows the renormalised ranking."""
    rankings_differ = False
    for seed in range(4):
        model = tiny_t5(seed)
        codes = torch.unique(gallery(seed, 12, 3, 32), dim=0)
        ids, mask = queries(seed)
        index = CodeIndex.from_codes(codes, model.config.vocab_size)
        subset = torch.cat([torch.tensor([EOS]), VOKENS])
        fast = constrained_beam_search(model, ids, mask, index, 16, eos_token_id=EOS, voken_ids=VOKENS)
        full = constrained_beam_search(model, ids, mask, index, 16, eos_token_id=EOS)
        renorm = teacher_forced(model, ids, mask, codes, EOS, subset=subset)
        for i in range(3):
            order = renorm[i].argsort(descending=True)
            assert torch.equal(fast.sequences[i], codes[order])
            torch.testing.assert_close(fast.scores[i], renorm[i][order], rtol=0, atol=1e-4)
        exact = teacher_forced(model, ids, mask, codes, EOS)
        assert bool((renorm > exact).all())  # renormalising over a subset raises every score
        for i in range(3):
            rankings_differ |= not torch.equal(fast.sequences[i], full.sequences[i])
        assert model.get_output_embeddings().out_features == model.config.vocab_size  # head restored
    assert rankings_differ


def test_fast_path_beam_scores_and_head_restored_on_error():
    model = tiny_t5(2)
    codes = gallery(2, 300, 4, 32)
    ids, mask = queries(2)
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    out = constrained_beam_search(model, ids, mask, index, 5, voken_ids=VOKENS)
    renorm = teacher_forced(model, ids, mask, codes, None, subset=VOKENS)
    for i in range(3):  # every returned beam's score is its renormalised log-prob
        rows = [codes.tolist().index(c) for c in out.sequences[i].tolist()]
        torch.testing.assert_close(out.scores[i], renorm[i][rows], rtol=0, atol=1e-4)
    head = model.get_output_embeddings()
    with pytest.raises(ValueError, match="not in voken_ids"):
        constrained_beam_search(model, ids, mask, index, 5, voken_ids=VOKENS[:4])
    assert model.get_output_embeddings() is head


def test_search_leaves_the_global_rng_alone():
    """A search (both paths, and the children score) draws nothing from torch's global RNG: an
    evaluation or a stage-2 candidate mining must not change the dropout of the training after it."""
    model = tiny_t5(3)
    codes = gallery(3, 40, 3, 32)
    ids, mask = queries(3)
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    constrained_beam_search(model, ids, mask, index, 5, eos_token_id=EOS, voken_ids=VOKENS)
    constrained_beam_search(model, ids, mask, index, 5, eos_token_id=EOS)
    constrained_beam_search(model, ids, mask, index, 5, voken_ids=VOKENS, normalize="children")
    assert torch.equal(torch.get_rng_state(), before)


def test_unconstrained_equals_index_of_all_codes():
    model = tiny_t5(4)
    subset = VOKENS[:4]
    all_codes = torch.tensor(list(itertools.product(subset.tolist(), repeat=3)))
    ids, mask = queries(4)
    index = CodeIndex.from_codes(all_codes, model.config.vocab_size)
    a = constrained_beam_search(model, ids, mask, index, 7, voken_ids=subset)
    b = constrained_beam_search(model, ids, mask, None, 7, voken_ids=subset, code_len=3)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.scores, b.scores)
    c = constrained_beam_search(model, ids, mask, None, 7, code_len=3)  # full vocabulary, no mask
    assert c.sequences.shape == (3, 7, 3) and bool(torch.isfinite(c.scores).all())
    assert bool((c.scores[:, :-1] >= c.scores[:, 1:]).all())


def test_padded_batch_equals_one_by_one_and_chunking():
    model = tiny_t5(5)
    codes = gallery(5, 400, 4, 16)
    ids, mask = queries(5, n=4, max_len=9)
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    batched = constrained_beam_search(model, ids, mask, index, 10, eos_token_id=EOS)
    chunked = constrained_beam_search(model, ids, mask, index, 10, eos_token_id=EOS, batch_size=3)
    assert torch.equal(batched.sequences, chunked.sequences)
    for i in range(4):
        n = int(mask[i].sum())
        single = constrained_beam_search(model, ids[i:i + 1, :n], None, index, 10, eos_token_id=EOS)
        assert torch.equal(single.sequences[0], batched.sequences[i])
        torch.testing.assert_close(single.scores[0], batched.scores[i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("eos", [None, EOS])
def test_decoder_only_left_padded_equals_hf_and_one_by_one(eos):
    model = tiny_llama(6)
    codes = gallery(6, 150, 4, 8)
    ids, mask = queries(6, n=3, max_len=7, left_pad=True)
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    out = constrained_beam_search(model, ids, mask, index, 8, eos_token_id=eos)
    for i, (hf_seqs, hf_scores) in enumerate(hf_ranked(model, ids, mask, codes, 8, eos, prompt_len=7)):
        assert torch.equal(out.sequences[i], hf_seqs)
        torch.testing.assert_close(out.scores[i], hf_scores, rtol=0, atol=1e-5)
        n = int(mask[i].sum())
        single = constrained_beam_search(model, ids[i:i + 1, 7 - n:], None, index, 8, eos_token_id=eos)
        assert torch.equal(single.sequences[0], out.sequences[i])
    right = ids.clone(), mask.clone()
    right[1][0, -1] = 0
    with pytest.raises(ValueError, match="LEFT-padded"):
        constrained_beam_search(model, right[0], right[1], index, 8)


def test_decode_benchmark_entry_point(tmp_path, monkeypatch):
    """The benchmark runs end to end on a tiny model and writes its results (no timing asserted)."""
    import json

    from avg.experiments import bench

    monkeypatch.setenv("WANDB_MODE", "disabled")
    bench.main(["decode", "--out-dir", str(tmp_path), "--model-preset", "tiny", "--gallery-sizes", "30,200",
                "--codebook-size", "16", "--num-beams", "5", "--num-queries", "3", "--batch-size", "2",
                "--repeats", "1", "--threads", "1", "--methods", "hf_trie,ours,ours_nomask,ours_fast"])
    result = json.loads((tmp_path / "bench_decode.json").read_text())
    rows = result["results"]
    assert [r["gallery_size"] for r in rows] == [30, 200]
    assert all(r["rankings_equal_frac"] == 1.0 and r["max_score_diff"] < 1e-4 for r in rows)
    assert all(r["index_mb"] > 0 and r["dict_trie_mb"] > 0 for r in rows)
    assert (tmp_path / "bench_decode.csv").read_text().count("\n") == 3


def test_decoder_only_fast_path_is_renormalised_exact_ranking():
    model = tiny_llama(8)
    codes = torch.unique(gallery(8, 6, 3, 32), dim=0)
    ids = torch.randint(3, BASE_VOCAB, (1, 5), generator=torch.Generator().manual_seed(8))
    index = CodeIndex.from_codes(codes, model.config.vocab_size)
    out = constrained_beam_search(model, ids, None, index, 8, voken_ids=VOKENS)
    with torch.no_grad():  # teacher forcing, softmax over the voken columns only
        logits = model(torch.cat([ids.repeat(codes.shape[0], 1), codes], 1)).logits[:, 4:-1, BASE_VOCAB:]
    renorm = logits.log_softmax(-1).gather(2, (codes - BASE_VOCAB)[..., None]).squeeze(-1).sum(1)
    order = renorm.argsort(descending=True)
    assert torch.equal(out.sequences[0], codes[order])
    torch.testing.assert_close(out.scores[0], renorm[order], rtol=0, atol=1e-4)


def test_a_search_prints_no_deprecation_warning(tmp_path):
    """transformers 5.24 renamed past_key_values to cache and warns (once per process) where the old name is
    passed or read: a constrained search of a T5 and of a LLaMA, in a fresh process, prints no such warning."""
    import os
    import subprocess
    import sys

    code = """
import warnings; warnings.simplefilter("always")
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration
from avg.search.beam import constrained_beam_search
from avg.search.code_index import CodeIndex
torch.manual_seed(0)
codes = torch.randint(10, 30, (20, 3))
t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
ids = torch.randint(2, 40, (2, 5))
for score in ("vocab", "children"):
    constrained_beam_search(t5, ids, torch.ones_like(ids), CodeIndex.from_codes(codes, 40), 4, decoder_start_token_id=0,
                            eos_token_id=1, normalize=score)
llama = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2)).eval()
constrained_beam_search(llama, ids, torch.ones_like(ids), CodeIndex.from_codes(codes, 40), 4, eos_token_id=1)
print("searched")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "warning"})
    assert res.returncode == 0 and "searched" in res.stdout, res.stderr[-3000:]
    assert "deprecated" not in res.stderr.lower(), res.stderr
