"""Diagnostics of a retriever run and of the tokenizer, against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from avg.metrics import recall_ks
from avg.retriever.diagnostics import code_diagnostics, run_diagnostics
from avg.search.gallery import Gallery


def test_recall_ks_cover_the_list_depth():
    assert recall_ks(20) == (1, 5, 10, 20)
    assert recall_ks(50) == (1, 5, 10, 20, 50)
    assert recall_ks(7) == (1, 5, 7)
    assert recall_ks(100) == (1, 5, 10, 20, 50, 100)


def test_run_diagnostics_first_miss_and_r1_by_code_sharing():
    # a and b share their code; c and d are alone on theirs
    g = Gallery(["a", "b", "c", "d"], [[1, 2, 3], [1, 2, 3], [1, 5, 6], [4, 5, 6]], seed=0)
    records = [
        {"gold": "c", "ranked": ["c", "a"]},            # hit: same code
        {"gold": "d", "ranked": ["c", "d"]},            # top code differs from gold at position 1
        {"gold": "c", "ranked": ["a", "c"]},            # differs at position 2
        {"gold": "a", "ranked": ["b", "a"]},            # the image sharing its code: same code, a miss at R@1
        {"gold": "b", "ranked": ["b", "a"]},            # shared, hit
        {"gold": "d", "ranked": []},                    # nothing returned
    ]
    d = run_diagnostics(records, g, num_levels=3)
    assert d["first_miss"] == {"1": pytest.approx(100 / 6, abs=0.01), "2": pytest.approx(100 / 6, abs=0.01),
                               "no_result": pytest.approx(100 / 6, abs=0.01), "same_code": pytest.approx(50.0)}
    assert d["queries_unique_code"] == 4 and d["r1_unique_code"] == 25.0
    assert d["queries_shared_code"] == 2 and d["r1_shared_code"] == 50.0
    # with a disambiguation position the sharing is judged on the quantizer levels only
    g2 = Gallery(["a", "b"], [[1, 2, 0], [1, 2, 1]])
    d2 = run_diagnostics([{"gold": "a", "ranked": ["a"]}], g2, num_levels=2)
    assert d2["queries_shared_code"] == 1 and d2["r1_shared_code"] == 100.0


def word_t5(words, *, seed: int, num_levels: int):
    """A word-level tokenizer over ``words``, a one-layer random T5 and its voken vocabulary (3 vokens a level)."""
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration
    from tokenizers import Tokenizer, models, pre_tokenizers

    from avg.retriever.vocab import VokenVocab

    table = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + k for k, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(vocab_size=len(table), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                                eos_token_id=1)).eval()
    vocab = VokenVocab(num_levels=num_levels, codebook_size=3, shared_codebook=False)
    vocab.add_to(tok, model, init="random")
    return tok, model, vocab


def test_code_diagnostics_positions_against_a_hand_computation():
    tok, model, vocab = word_t5(["red", "blue", "star"], seed=0, num_levels=2)
    g = Gallery(["x", "y", "z"], [[0, 1], [0, 2], [2, 1]])
    queries = [{"query": "red star", "code": [0, 2], "image_id": "y"}, {"query": "blue", "code": [2, 1], "image_id": "z"}]
    records = [{"gold": "y", "ranked": ["x", "y", "z"]}, {"gold": "z", "ranked": ["z", "x", "y"]}]
    d = code_diagnostics(model, tok, vocab, queries, g, records, "cpu", batch_size=1)
    # by hand: logits with the gold prefix, allowed children from the gallery's tree
    top, lp, mass = np.zeros(2), np.zeros(2), np.zeros(2)
    for q in queries:
        enc = tok([q["query"]], return_tensors="pt")
        gold = vocab.code_to_token_ids([q["code"]])[0]
        with torch.no_grad():
            logits = model(**enc, decoder_input_ids=torch.tensor([[0, int(gold[0])]])).logits[0].double()
        level0 = vocab.position_id_tensor(0)[[0, 2]]  # codes start with 0 or 2
        after = {0: vocab.position_id_tensor(1)[[1, 2]], 2: vocab.position_id_tensor(1)[[1]]}[q["code"][0]]
        for t, allowed in enumerate((level0, after)):
            row = logits[t]
            top[t] += float(row[gold[t]] >= row[allowed].max())
            lp[t] += float(row[gold[t]] - torch.logsumexp(row[allowed], 0))
            mass[t] += float(torch.logsumexp(row[allowed], 0) - torch.logsumexp(row, 0))
    for t in range(2):
        p = d["positions"][t]
        assert p["gold_is_top"] == pytest.approx(100 * top[t] / 2, abs=0.01)
        assert p["gold_logprob"] == pytest.approx(lp[t] / 2, abs=1e-3)
        assert p["allowed_log_mass"] == pytest.approx(mass[t] / 2, abs=1e-3)
    assert d["positions"][0]["children"] == 2 and d["positions"][1]["children"] == 1.5
    assert d["first_miss"] == {"2": 50.0, "same_code": 50.0}


def test_tokenizer_ceiling_against_a_naive_ranking(tmp_path):
    """Decoded codes and raw image features rank a split's captions like a plain cosine ranking."""
    from avg.models.rqvae import RQVAE, RQVAEConfig
    from avg.artifacts.emb import load_emb, save_emb
    from avg.stages.generate_codes import tokenizer_ceiling

    rng = np.random.default_rng(0)
    n_img, dim = 12, 8
    img = rng.normal(size=(n_img, dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img[np.repeat(np.arange(n_img), 2)] + 0.3 * rng.normal(size=(2 * n_img, dim)).astype(np.float32)
    images = [{"image_id": f"im{i}", "file": f"im{i}.png", "split": "val" if i < 6 else "train"} for i in range(n_img)]
    captions = [{"text": f"c{j}", "image_row": j // 2, "split": images[j // 2]["split"]} for j in range(2 * n_img)]
    save_emb(tmp_path / "emb", img, txt, images, captions, {"model": "toy", "normalized": True})
    emb = load_emb(tmp_path / "emb")
    torch.manual_seed(0)
    model = RQVAE(RQVAEConfig(input_dim=dim, hidden_dims=[16], latent_dim=4, num_levels=2, codebook_size=3)).eval()
    raw = model.encode(torch.from_numpy(img)).numpy()
    ids = [im["image_id"] for im in images]
    got = tokenizer_ceiling(model, emb, raw, ids, "val")
    # naive: cosine of each val caption to each val image's (decoded) vector; rank with ties broken by the gallery
    val = np.arange(6)
    q = txt[:12] / np.linalg.norm(txt[:12], axis=1, keepdims=True)
    hits1 = sum(int(np.argmax(img[val] @ q[j]) == j // 2) for j in range(12))
    assert got["image_features"]["R@1"] == pytest.approx(100 * hits1 / 12, abs=0.01)
    dec = model.decode_codes(torch.from_numpy(raw[val])).detach().numpy()
    dec /= np.linalg.norm(dec, axis=1, keepdims=True)
    gallery = Gallery([ids[i] for i in val], raw[val])
    hits1 = 0
    for j in range(12):
        s = dec @ q[j]
        order = np.argsort(-s, kind="stable")
        codes = [tuple(raw[val][i]) for i in order]
        seen, ranked = set(), []
        for c in codes:
            if c not in seen:
                seen.add(c)
                ranked += gallery.images_for(c)
        hits1 += int(ranked[0] == ids[j // 2])
    assert got["decoded_codes"]["R@1"] == pytest.approx(100 * hits1 / 12, abs=0.01)
    assert got["decoded_codes"]["gallery_size"] == 6 and got["decoded_codes"]["num_queries"] == 12
    # per position: does the best image under the gold prefix carry the gold voken there? (by brute force)
    vcodes = raw[val]
    for name, keys in (("image_features", img[val]), ("decoded_codes", dec)):
        expect = []
        for t in range(2):
            hits = 0
            for j in range(12):
                g = j // 2
                under = [i for i in range(6) if tuple(vcodes[i][:t]) == tuple(vcodes[g][:t])]
                best = max(under, key=lambda i: (float(keys[i] @ q[j]), -i))
                hits += int(vcodes[best][t] == vcodes[g][t])
            expect.append(100 * hits / 12)
        assert got[name]["gold_is_top"] == pytest.approx(expect, abs=0.01), name
    assert tokenizer_ceiling(model, emb, raw, ids, "test") is None


def test_given_prefix_recall_against_scoring_each_code_alone():
    """Code R@1 given the gold's first t vokens: the gold must score highest among the distinct codes sharing that
    prefix, each scored on its own by a teacher-forced pass (the children score) -- with and without a seeded sample."""
    from avg.search.code_index import code_log_probs
    from avg.retriever.diagnostics import given_prefix_recall

    tok, model, vocab = word_t5(["red", "blue", "star", "big"], seed=3, num_levels=3)
    rng = np.random.default_rng(0)
    codes = sorted({tuple(int(v) for v in rng.integers(0, 3, 3)) for _ in range(20)})
    g = Gallery([f"i{k}" for k in range(len(codes))], [list(c) for c in codes])
    texts = ["red star", "blue", "big red", "star star blue", "big", "blue red big"]
    queries = [{"query": t, "code": list(codes[(5 * k) % len(codes)]), "image_id": f"i{(5 * k) % len(codes)}"}
               for k, t in enumerate(texts)]
    index = g.build_index(vocab, model.config.vocab_size)
    tokens = g.token_codes(vocab)

    def score(query, code_ids):
        enc = tok([query], return_tensors="pt")
        dec = torch.cat([torch.zeros(1, 1, dtype=torch.long), code_ids[None, :-1]], 1)
        with torch.no_grad():
            logits = model(**enc, decoder_input_ids=dec).logits
        return float(code_log_probs(logits, code_ids[None], index).sum())

    expect = np.zeros(2)
    sizes = np.zeros(2)
    for q in queries:
        gold = vocab.code_to_token_ids([q["code"]])[0]
        s_gold = score(q["query"], gold)
        for t in (1, 2):
            under = [c for c in tokens if torch.equal(c[:t], gold[:t])]
            sizes[t - 1] += len(under)
            expect[t - 1] += all(score(q["query"], c) <= s_gold + 1e-6 for c in under if not torch.equal(c, gold))
    assert 0 < expect[0] < 6  # some queries lose their gold to a code under the first voken, some do not
    got = given_prefix_recall(model, tok, vocab, queries, g, "cpu", batch_size=4, pair_batch=5)
    assert [r["position"] for r in got] == [1, 2] and all(r["num_queries"] == 6 for r in got)
    for t in (1, 2):
        assert got[t - 1]["code_r1"] == pytest.approx(100 * expect[t - 1] / 6, abs=0.01)
        assert got[t - 1]["codes"] == pytest.approx(sizes[t - 1] / 6, abs=0.01)
    assert got[1]["code_r1"] >= got[0]["code_r1"]
    sample = given_prefix_recall(model, tok, vocab, queries, g, "cpu", max_queries=3, seed=1)
    assert all(r["num_queries"] == 3 for r in sample)
    assert sample == given_prefix_recall(model, tok, vocab, queries, g, "cpu", max_queries=3, seed=1)
