"""Rerankers that see the image's CLIP features: the embedding rerank against a naive re-scoring,
the fusion weight chosen on val only, the LM reranker's soft image prefix under any padding and
the shared prefix, late interaction, fusion with the cosine, SEED token rows and <img> wrapping,
CLIP-mined training lists, and the stages end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from avg.artifacts.runfiles import write_run
from avg.reranker import model as RM
from avg.reranker import lm_setup
from avg.reranker import saving
from avg.reranker import scoring
from avg.stages import test_reranker_llama as rerank_test, prepare_reranker_dataset as prepare_dataset, rerank_embed, finetune_reranker_llama as train
from avg.reranker.data import ListCollator, ListDataset, candidate_lists, clip_lists, load_lists, shorten_list
from avg.reranker.embed import FeatureStore, choose_weight, fit_embed_weight, fused_scores, rerank_list, rerank_records
from avg.reranker.image_tokens import ImageTokenMap, build_image_tokens, image_token
from avg.reranker.step import LmRerankStep
from avg.retriever import llama as L
from avg.search.gallery import Gallery
from avg.artifacts.emb import save_emb
from avg.core.io import InputError
from test_reranker import (codes_data, fake_records, make_llama, make_tokenizer, one_thread,  # noqa: F401 (fixtures)
                           prepare_args, stage_inputs, train_args)

DIM = 6


GRID_CELLS, GRID_WIDTH = 4, 5


def write_emb(path, image_ids, captions_of, seed=0, grid=False):
    """prepare_emb/ with random unit features for the images and their captions (caption features near their
    image's); with ``grid``, random image grids of GRID_CELLS x GRID_WIDTH too."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(len(image_ids), DIM)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    images = [{"image_id": i, "file": f"{i}.png", "split": "train"} for i in image_ids]
    caps, txt = [], []
    for r, i in enumerate(image_ids):
        for text in captions_of(i):
            caps.append({"text": text, "image_row": r, "split": "train"})
            txt.append(img[r] + 0.5 * rng.normal(size=DIM))
    txt = np.asarray(txt, dtype=np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    cells = rng.normal(size=(len(image_ids), GRID_CELLS, GRID_WIDTH)).astype(np.float16) if grid else None
    save_emb(path, img, txt, images, caps, {"model": "toy", "normalized": True}, image_grid=cells)
    return FeatureStore.load(path)


# ---------------------------------------------------------------------------- embedding rerank
def test_embed_rerank_equals_a_naive_rescoring(tmp_path):
    ids = [f"img{i}" for i in range(8)]
    store = write_emb(tmp_path / "emb", ids, lambda i: [f"q {i}"])
    rng = np.random.default_rng(1)
    records = [{"qid": n, "query": f"q {g}", "gold": g, "ranked": list(rng.permutation(ids)[:5]),
                "scores": sorted(rng.normal(size=5).tolist(), reverse=True)} for n, g in enumerate(ids)]
    for w in (0.0, 0.3, math.inf):
        got = rerank_records(records, store, w, k=4)
        for rec, out in zip(records, got):
            t = store.emb.text_features[store.caption_row[(rec["gold"], rec["query"])]].astype(np.float64)
            t /= np.linalg.norm(t)
            rows = [store.image_row[c] for c in rec["ranked"][:4]]
            v = store.emb.image_features[rows].astype(np.float64)
            cos = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ t
            rel = np.array(rec["scores"][:4]) - max(rec["scores"][:4])
            naive = rel * 1e6 + cos if math.isinf(w) else cos + w * rel
            order = sorted(range(4), key=lambda j: (-naive[j], j))
            assert out["ranked"] == [rec["ranked"][j] for j in order]
        if math.isinf(w):  # the retriever's own order
            assert [o["ranked"] for o in got] == [r["ranked"][:4] for r in records]
    # unknown retriever scores add nothing
    assert fused_scores(np.array([0.1, 0.5]), [None, None], 1.0).tolist() == pytest.approx([0.1, 0.5])
    # w = inf keeps the retriever's order, the cosine breaking only its ties -- no NaN at the top
    ids, fused = rerank_list(["a", "b", "c", "d"], [3.0, 2.0, 2.0, 1.0], np.array([0.0, 0.1, 0.5, 0.9]), float("inf"))
    assert ids == ["a", "c", "b", "d"] and all(np.isfinite(fused))
    assert rerank_list(["a", "b"], [1.0, 0.0], np.array([0.1, 0.9]), 0.0)[0] == ["b", "a"]  # w = 0: cosine alone
    with pytest.raises(InputError, match="has no CLIP text feature|is not a caption"):
        rerank_records([{"qid": 0, "query": "unknown", "gold": "img0", "ranked": ids, "scores": [0.0] * 8}], store, 0.0, 3)


def test_embed_rerank_stage_chooses_the_weight_on_val_only(tmp_path):
    """Val prefers the retriever's order (its cosine ranks the gold last); test would prefer CLIP's:
    the stage takes val's weight and applies it to test."""
    ids = [f"img{i}" for i in range(6)]
    store = write_emb(tmp_path / "emb", ids, lambda i: [f"q {i}"])

    def records(prefer_retriever: bool):
        out = []
        for n, g in enumerate(ids):
            t = store.texts([{"gold": g, "query": f"q {g}"}])[0]
            by_cos = sorted(ids, key=lambda c: -float(store.images([c])[0] @ t))
            ranked = [g] + [c for c in reversed(by_cos) if c != g] if prefer_retriever else list(reversed(by_cos))
            out.append({"qid": n, "query": f"q {g}", "gold": g, "ranked": ranked, "scores": [-float(j) for j in range(6)]})
        return out

    best = tmp_path / "retriever" / "best"
    best.mkdir(parents=True)
    (best / "best.json").write_text(json.dumps({"epoch": 1}))
    write_run(records(True), best.parent / "eval" / "run_val_epoch1.jsonl")
    write_run(records(False), best.parent / "eval" / "run_test.jsonl")
    out = rerank_embed.main(["--retriever-dir", str(best), "--emb-dir", str(tmp_path / "emb"), "--out-dir",
                             str(tmp_path / "out"), "--topk", "6", "--weights", "0,inf", "--retriever-name", "toy"])
    fusion = json.loads((tmp_path / "out" / "fusion.json").read_text())
    assert fusion["chosen_weight"] == math.inf and out["test"]["fusion_weight"] == math.inf
    assert out["val"]["R@1"] == 100.0 and out["test"]["R@1"] == out["test"]["before"]["R@1"]
    w, grid = choose_weight(records(False), store, 6, (0.0, math.inf))
    assert w == 0.0  # on the other split the other weight would have won
    m = json.loads((tmp_path / "out" / "metrics_test.json").read_text())
    assert m["system"] == "toy+embed_rerank" and m["list_recall"] == 100.0 and m["ms_per_query"] > 0
    with pytest.raises(InputError, match="fewer than --topk"):
        rerank_embed.main(["--retriever-dir", str(best), "--emb-dir", str(tmp_path / "emb"), "--out-dir",
                           str(tmp_path / "out2"), "--topk", "7"])


# ---------------------------------------------------------------------------- the LM reranker with features
def feature_setup(tmp_path, **kw):
    codes = codes_data()
    tokens = build_image_tokens(codes)
    image_ids = sorted(tokens.images)
    lists = candidate_lists(fake_records(image_ids, 6, 5, 3), 5, insert_positive=False)
    lists[1]["query"] = "a red cube on the table is a red cube on the table"
    lists[2]["candidates"], lists[2]["scores"] = lists[2]["candidates"][:3], lists[2]["scores"][:3]
    queries = {x["gold"]: [] for x in lists}
    for x in lists:
        queries[x["gold"]].append(x["query"])
    grid = bool(kw.get("grid_slots"))
    store = write_emb(tmp_path / "emb", image_ids, lambda i: queries.get(i, []), grid=grid)
    if grid:
        kw = {**kw, "grid_cells": GRID_CELLS, "grid_width": GRID_WIDTH}
    tok = L.prepare_tokenizer(make_tokenizer())
    lm = make_llama(len(tok))
    ids, _ = lm_setup.ensure_image_tokens(tok, lm, tokens.mapping, tokens.vectors)
    torch.manual_seed(0)
    rr = RM.Reranker(lm, head_inner=16, head_dropout=0.0, fusion="fixed", fusion_weight=0.3, feature_dim=DIM, **kw).eval()
    ds = ListDataset(lists, tok, saving.image_token_ids(tokens, ids), L.prompt_formatter(RM.DEFAULT_PROMPT_TEMPLATE),
                     image_prefix=kw.get("image_prefix", 0), features=store, image_grid=grid)
    return rr, ds, store


@torch.no_grad()
def test_soft_image_prefix_scores_equal_under_left_right_padding_and_shared_prefix(tmp_path):
    rr, ds, store = feature_setup(tmp_path, image_prefix=2, feature_head=True, embed_fusion="fixed", embed_weight=2.0)
    idx = list(range(len(ds)))
    right, left = ListCollator(ds, "right")(idx), ListCollator(ds, "left")(idx)
    pair_t = right["query_features"][right["list_index"]]
    pair_v = right["candidate_features"][right["valid"]]
    # reference: each sequence alone, the soft tokens written over its placeholders
    body, ref, p = rr.body(), [], 0
    for i in idx:
        for c in ds.lists[i]["candidates"]:
            seq = torch.tensor([ds.prompts[i] + ds.candidate_tokens(c)])
            emb = body.get_input_embeddings()(seq).clone()
            n = len(ds.prompts[i])
            emb[0, n:n + 2] = rr.image_proj(pair_v[p]).view(2, -1)
            h = body(inputs_embeds=emb).last_hidden_state[0, -1]
            t, v = pair_t[p], pair_v[p]
            ref.append(rr.head(torch.cat([h, v, t * v, t])))
            p += 1
    ref = torch.stack(ref)
    flat_r = rr.score_pairs(right["input_ids"], right["attention_mask"], right["soft_start"], pair_t, pair_v)
    flat_l = rr.score_pairs(left["input_ids"], left["attention_mask"], left["soft_start"], pair_t, pair_v)
    assert torch.allclose(flat_r, ref, atol=1e-5) and torch.allclose(flat_l, ref, atol=1e-5)
    base, fused = rr(**scoring.model_inputs(right, "cpu"))  # shared-prefix path
    assert torch.allclose(base[right["valid"]], ref + 2.0 * right["cosine"][right["valid"]], atol=1e-5)
    rel = RM.relative_retriever_scores(right["retriever_scores"], right["known"])
    assert torch.allclose(fused[right["valid"]], (base + 0.3 * rel)[right["valid"]], atol=1e-5)
    cos = (right["candidate_features"] * right["query_features"][:, None]).sum(-1)
    assert torch.allclose(right["cosine"], cos) and torch.isinf(base[2, 3:]).all()


@torch.no_grad()
def test_late_interaction_reads_the_prompt_once(tmp_path):
    rr, ds, _ = feature_setup(tmp_path, feature_head=True, candidate_tokens=False, query_pooling="mean")
    batch = ListCollator(ds)(list(range(len(ds))))
    base, _ = rr(**scoring.model_inputs(batch, "cpu"))
    body, p = rr.body(), 0
    for i in range(len(ds)):
        h = body(input_ids=torch.tensor([ds.prompts[i]])).last_hidden_state[0].mean(0)
        t = batch["query_features"][i]
        for j in range(len(ds.lists[i]["candidates"])):
            v = batch["candidate_features"][i, j]
            assert float(base[i, j]) == pytest.approx(float(rr.head(torch.cat([h, v, t * v, t]))), abs=1e-5)
    with pytest.raises(ValueError, match="needs feature_head"):
        RM.Reranker(make_llama(40), feature_dim=DIM, candidate_tokens=False)
    with pytest.raises(ValueError, match="feature_dim"):
        RM.Reranker(make_llama(40), image_prefix=2)


@torch.no_grad()
def test_grid_head_scores_each_candidate_grid_from_the_query_slots(tmp_path):
    rr, ds, store = feature_setup(tmp_path, feature_head=True, candidate_tokens=False, query_pooling="mean", grid_slots=3)
    batch = ListCollator(ds)(list(range(len(ds))))
    assert batch["candidate_grid"].shape == (len(ds), 5, GRID_CELLS, GRID_WIDTH)
    assert (batch["candidate_grid"][2, 3:] == 0).all()  # past the short list's end
    start, _ = rr(**scoring.model_inputs(batch, "cpu"))
    torch.nn.init.normal_(rr.grid_head.score[-1].weight)  # untrained, the grid head adds exactly nothing
    without = {k: v for k, v in batch.items() if k != "candidate_grid"}
    with pytest.raises(ValueError, match="candidate_grid"):
        rr(**scoring.model_inputs(without, "cpu"))
    base, _ = rr(**scoring.model_inputs(batch, "cpu"))
    body, gh = rr.body(), rr.grid_head
    for i in range(len(ds)):  # naive: one query, one candidate at a time
        states = body(input_ids=torch.tensor([ds.prompts[i]])).last_hidden_state
        slots = gh.summarise(states, torch.ones(states.shape[:2], dtype=torch.long))
        for j, c in enumerate(ds.lists[i]["candidates"]):
            grid = torch.from_numpy(store.emb.image_grid[store.image_row[c]].astype(np.float32))[None]
            assert torch.equal(batch["candidate_grid"][i, j], grid[0])
            expect = float(start[i, j]) + float(gh(slots, grid)[0])
            assert float(base[i, j]) == pytest.approx(expect, abs=1e-5)
    assert not torch.allclose(base[batch["valid"]], start[batch["valid"]])
    with pytest.raises(ValueError, match="late interaction"):
        RM.Reranker(make_llama(40), feature_dim=DIM, feature_head=True, grid_slots=2, grid_width=5, grid_cells=4)
    plain = write_emb(tmp_path / "plain", ["a"], lambda i: ["q"])
    with pytest.raises(InputError, match="plain: no image_grid.npy"):
        plain.grid_shape("plain")


def listwise_cosine_loss(cosines, labels, u):
    """The naive mean of -log softmax(u * cos)[positive], one list at a time."""
    out = []
    for c, y in zip(cosines, labels):
        z = u * np.asarray(c, dtype=np.float64)
        out.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[y])
    return float(np.mean(out))


def test_embed_weight_fit_minimises_the_cosine_listwise_loss_and_datasets_give_the_batch_cosines(tmp_path):
    rng = np.random.default_rng(3)
    cosines = [rng.uniform(-0.2, 0.5, size=n) for n in rng.integers(2, 9, size=40)]
    labels = [int(np.argmax(c + rng.normal(scale=0.15, size=len(c)))) for c in cosines]  # the cosine mostly right
    u = fit_embed_weight(cosines, labels)
    grid = np.exp(np.linspace(np.log(0.1), np.log(1000), 4001))
    naive = grid[int(np.argmin([listwise_cosine_loss(cosines, labels, g) for g in grid]))]
    assert u == pytest.approx(naive, rel=3e-3)
    assert listwise_cosine_loss(cosines, labels, u) <= min(listwise_cosine_loss(cosines, labels, u * f) for f in (0.9, 1.1))
    assert fit_embed_weight(cosines, labels, temperature=2.0) == pytest.approx(2 * u, rel=1e-6)  # u / T is what counts
    wrong = [int(np.argmin(c)) for c in cosines]  # the positive always least similar: the smallest u allowed
    assert fit_embed_weight(cosines, wrong, lo=0.5) == 0.5
    sure = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]  # perfectly separable: the largest u allowed
    assert fit_embed_weight(sure, [0, 1], hi=50.0) == 50.0
    assert fit_embed_weight(cosines + [np.array([0.9, 0.1])], labels + [-1]) == u  # a list without its positive: left out
    with pytest.raises(ValueError, match="one positive index per list"):
        fit_embed_weight(cosines, labels[:-1])
    with pytest.raises(ValueError, match="no list holds its positive"):
        fit_embed_weight(cosines[:2], [-1, -1])
    with pytest.raises(ValueError, match="outside its list"):
        fit_embed_weight([np.array([0.1, 0.2])], [2])
    _, ds, _ = feature_setup(tmp_path)
    batch = ListCollator(ds)(list(range(len(ds))))
    for i, c in enumerate(ds.cosines()):
        assert np.allclose(c, batch["cosine"][i, : len(c)].numpy(), atol=1e-6)


def test_shortened_training_lists_keep_their_positive():
    lst = {"qid": 1, "query": "q", "gold": "g", "candidates": ["a", "b", "c", "g", "d"], "scores": [5.0, 4.0, 3.0, 2.0, 1.0],
           "gold_rank": 4, "inserted": False}
    cut = shorten_list(lst, 2)
    assert cut["candidates"] == ["a", "g"] and cut["scores"] == [5.0, None] and cut["inserted"]
    kept = shorten_list(lst, 4)
    assert kept["candidates"] == ["a", "b", "c", "g"] and kept["scores"] == [5.0, 4.0, 3.0, 2.0] and not kept["inserted"]
    assert shorten_list(lst, 9) is lst and lst["candidates"] == ["a", "b", "c", "g", "d"]  # the input is left alone
    missing = {**lst, "gold": "z"}
    assert shorten_list(missing, 2)["candidates"] == ["a", "b"]  # no positive to keep
    with pytest.raises(InputError, match="at least one"):
        shorten_list(lst, 0)


def test_fusion_weight_is_chosen_on_the_given_lists():
    lists = [{"qid": 0, "query": "q", "gold": "b", "candidates": ["a", "b"], "scores": [0.0, -1.0]},
             {"qid": 1, "query": "q", "gold": "a", "candidates": ["a", "b"], "scores": [0.0, -1.0]}]
    parts = {0: ([0.0, 0.5], [0.0, -1.0]), 1: ([0.0, 0.5], [0.0, -1.0])}  # head prefers b; retriever prefers a
    w, rows = scoring.choose_fusion_weight(lists, parts, weights=(0.0, 0.4, 1.0))
    assert w == 0.0 and [r["R@1"] for r in rows] == [50.0, 50.0, 50.0]  # a tie: the smallest weight
    parts = {0: ([0.0, 0.5], [0.0, -1.0]), 1: ([0.0, 0.3], [0.0, -1.0])}
    w, rows = scoring.choose_fusion_weight(lists, parts, weights=(0.0, 0.4, 1.0))
    assert w == 0.4 and rows[1]["R@1"] == 100.0  # 0.4 ranks b first for list 0 and a first for list 1


def test_seed_rows_are_reinitialised_unless_asked_and_images_are_wrapped():
    m = ImageTokenMap.from_codes_meta(codes_data().meta)
    seed_tok = make_tokenizer(extra=[image_token(i) for i in range(8)] + ["<img>", "</img>"])
    lm = make_llama(len(seed_tok))
    before = lm.get_input_embeddings().weight.detach().clone()
    vectors = build_image_tokens(codes_data()).vectors
    ids, added = lm_setup.ensure_image_tokens(seed_tok, lm, m, vectors)
    assert not added and not torch.equal(lm.get_input_embeddings().weight[ids], before[ids])
    untouched = torch.ones(len(seed_tok), dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(lm.get_input_embeddings().weight[untouched], before[untouched])
    lm2 = make_llama(len(seed_tok))
    before2 = lm2.get_input_embeddings().weight.detach().clone()
    lm_setup.ensure_image_tokens(seed_tok, lm2, m, vectors, reuse_rows=True)
    assert torch.equal(lm2.get_input_embeddings().weight, before2)  # SEED's own rows, by explicit choice
    wrap = lm_setup.image_wrap_ids(seed_tok)
    assert wrap == ([seed_tok.convert_tokens_to_ids("<img>")], [seed_tok.convert_tokens_to_ids("</img>")])
    assert lm_setup.image_wrap_ids(make_tokenizer()) == ([], [])
    tokens = build_image_tokens(codes_data())
    lists = candidate_lists(fake_records(sorted(tokens.images), 2, 3, 0), 3, insert_positive=False)
    ds = ListDataset(lists, L.prepare_tokenizer(seed_tok), saving.image_token_ids(tokens, ids),
                     L.prompt_formatter(RM.DEFAULT_PROMPT_TEMPLATE), wrap=wrap)
    c = lists[0]["candidates"][0]
    assert ds.candidate_tokens(c) == wrap[0] + ds.image_ids[c] + wrap[1] + [ds.eos]


def test_clip_lists_are_the_top_k_cosine_in_the_gold_chunk(tmp_path):
    ids = [f"img{i}" for i in range(10)]
    store = write_emb(tmp_path / "emb", ids, lambda i: [f"q {i}"])
    galleries = Gallery(ids, np.arange(20).reshape(10, 2)).chunks(5, 0)
    queries = [{"qid": n, "query": f"q {i}", "image_id": i} for n, i in enumerate(ids)]
    lists = clip_lists(queries, galleries, store, 3)
    for q, x in zip(queries, lists):
        gal = next(g for g in galleries if q["image_id"] in g.image_ids)
        t = store.texts([{"gold": q["image_id"], "query": q["query"]}])[0]
        by_cos = sorted(gal.image_ids, key=lambda c: -float(store.images([c])[0] @ t))[:3]
        assert q["image_id"] in x["candidates"] and set(x["candidates"]) <= set(gal.image_ids)
        if x["inserted"]:
            assert x["candidates"] == by_cos[:2] + [q["image_id"]]
        else:
            assert x["candidates"] == by_cos
        assert x["scores"] == [None] * 3


def test_feature_reranker_stages_end_to_end(tmp_path, stage_inputs):
    """CLIP-mined training lists, late interaction with the cosine fused and the retriever's weight
    chosen on val; then a cross-encoder with a soft image prefix; both tested."""
    root = stage_inputs
    data_dir = root / "retriever_data"
    captions = {}
    for split in ("train", "val", "test"):
        for line in open(data_dir / f"{split}.jsonl"):
            r = json.loads(line)
            captions.setdefault(r["image_id"], []).append(r["query"])
    for split in ("val", "test"):  # the run files' queries are captions too
        for line in open(root / f"run_{split}.jsonl"):
            r = json.loads(line)
            captions.setdefault(r["gold"], []).append(r["query"])
    ids = sorted(json.loads((data_dir / "gallery_train.json").read_text())) + sorted(
        json.loads((data_dir / "gallery_val.json").read_text())) + sorted(json.loads((data_dir / "gallery_test.json").read_text()))
    write_emb(tmp_path / "emb", ids, lambda i: list(dict.fromkeys(captions.get(i, []))))
    data = tmp_path / "reranker_data"
    meta = prepare_dataset.main(prepare_args(root, data, "--train-candidates", "clip", "--emb-dir", str(tmp_path / "emb")))
    assert "CLIP features" in meta["splits"]["train"]["source"]
    assert all(x["gold"] in x["candidates"] for x in load_lists(data / "train.jsonl"))
    with pytest.raises(InputError, match="needs --emb-dir"):
        prepare_dataset.main(prepare_args(root, tmp_path / "x", "--train-candidates", "clip"))
    feats = ["--emb-dir", str(tmp_path / "emb")]
    res = train.main(train_args(root, data, tmp_path / "late", *feats, "--late-interaction", "--embed-fusion", "learned",
                                "--fusion", "val", "--query-pooling", "mean"))
    assert res["global_step"] > 0
    saved = json.loads((tmp_path / "late" / "best" / saving.META_FILE).read_text())
    assert saved["candidate_tokens"] is False and saved["emb_dir"] == str(tmp_path / "emb") and saved["fusion"] == "val"
    assert "fusion weight chosen on val" in (tmp_path / "late" / "train.log").read_text()
    m = rerank_test.main(["--reranker-dir", str(tmp_path / "late" / "best"), "--data-dir", str(data),
                          "--out-dir", str(tmp_path / "late_test"), "--retriever-name", "toy"])
    assert m["late_interaction"] and m["fusion_weight"] == saved["fusion_weight"] and m["list_recall"] == m["before"]["R@3"]
    with pytest.raises(InputError, match="--emb-dir"):
        train.main(train_args(root, data, tmp_path / "bad", "--late-interaction"))
    train.main(train_args(root, data, tmp_path / "cross", *feats, "--image-prefix", "2", "--feature-head", "--epochs", "1"))
    m2 = rerank_test.main(["--reranker-dir", str(tmp_path / "cross" / "best"), "--data-dir", str(data),
                           "--out-dir", str(tmp_path / "cross_test"), "--retriever-name", "toy"])
    m3 = rerank_test.main(["--reranker-dir", str(tmp_path / "cross" / "best"), "--data-dir", str(data),
                           "--out-dir", str(tmp_path / "cross_test2"), "--retriever-name", "toy", "--no-shared-prefix"])
    assert m2["image_prefix"] == 2 and [m2[k] for k in ("R@1", "R@3", "mean_rank")] == [m3[k] for k in ("R@1", "R@3", "mean_rank")]
    # the grid head: needs late interaction and an prepare_emb/ with image grids; saved, reloaded and tested
    with pytest.raises(InputError, match="image_grid.npy"):
        train.main(train_args(root, data, tmp_path / "nogrid", *feats, "--late-interaction", "--grid-head", "2"))
    with pytest.raises(InputError, match="--late-interaction"):
        train.main(train_args(root, data, tmp_path / "nolate", *feats, "--grid-head", "2"))
    write_emb(tmp_path / "emb_grid", ids, lambda i: list(dict.fromkeys(captions.get(i, []))), grid=True)
    gridded = ["--emb-dir", str(tmp_path / "emb_grid")]
    with pytest.raises(InputError, match="--embed-fusion"):
        train.main(train_args(root, data, tmp_path / "nofit", *gridded, "--late-interaction", "--grid-head", "2",
                              "--fit-embed-weight"))
    train.main(train_args(root, data, tmp_path / "grid", *gridded, "--late-interaction", "--grid-head", "2",
                          "--embed-fusion", "learned", "--epochs", "1", "--train-topk", "2",
                          "--train-lists", "found", "--fit-embed-weight"))
    short = [shorten_list(x, 2) for x in load_lists(data / "train.jsonl")]
    found = [x for x in short if not x["inserted"]]
    assert 0 < len(found) < len(short)  # the toy lists have both kinds
    log = (tmp_path / "grid" / "train.log").read_text()
    assert f"--train-lists found: {len(found)} of {len(short)} training lists" in log
    assert "embed weight u fitted on the %d training lists" % len(found) in log
    saved = json.loads((tmp_path / "grid" / "best" / saving.META_FILE).read_text())
    assert saved["feature_head"] is False  # the grid head sees the candidate: no feature head unless asked
    assert (saved["grid_slots"], saved["grid_cells"], saved["grid_width"]) == (2, GRID_CELLS, GRID_WIDTH)
    m4 = rerank_test.main(["--reranker-dir", str(tmp_path / "grid" / "best"), "--data-dir", str(data),
                           "--out-dir", str(tmp_path / "grid_test"), "--retriever-name", "toy"])
    assert m4["late_interaction"] and 0.0 <= m4["R@1"] <= m4["list_recall"]
    # the same reranker as a step of the pipeline (API, efficiency benchmark): typed queries with their
    # CLIP features, lists made at query time -> the test stage's ranking and scores
    step = LmRerankStep.load(tmp_path / "grid" / "best", device="cpu", emb_dir=str(tmp_path / "emb_grid"))
    lists = load_lists(data / "test.jsonl")
    feats_q = FeatureStore.load(tmp_path / "emb_grid").texts(lists)
    got = step.rerank([x["query"] for x in lists], [x["candidates"] for x in lists], [x["scores"] for x in lists],
                      torch.from_numpy(feats_q))
    stage_run = [json.loads(line) for line in open(tmp_path / "grid_test" / "run_test.jsonl")]
    assert [ids for ids, _ in got] == [r["ranked"] for r in stage_run]
    assert np.allclose([s for _, sc in got for s in sc], [s for r in stage_run for s in r["scores"]], atol=1e-5)
    assert step.covers(lists[0]["candidates"]) and not step.covers(["not_an_image"])
    assert step.rerank(["q"], [[]], [[]], feats_q[:1]) == [([], [])]
    with pytest.raises(ValueError, match="query_features"):
        step.rerank([lists[0]["query"]], [lists[0]["candidates"]], [lists[0]["scores"]])
    with pytest.raises(InputError, match="image_grid.npy"):  # the same reranker pointed at features without grids
        rerank_test.main(["--reranker-dir", str(tmp_path / "grid" / "best"), "--data-dir", str(data), "--emb-dir",
                          str(tmp_path / "emb"), "--out-dir", str(tmp_path / "grid_test2"), "--retriever-name", "toy"])
    assert not (tmp_path / "grid_test2").exists()  # refused before the stage wrote anything


def test_the_control_is_the_same_reranker_over_the_two_towers_lists(tmp_path, stage_inputs):
    """prepare_reranker_dataset --control clip writes the two-tower's own top-k of val and test (exact search on the
    same features, no inserted positive); the trainer chooses a second epoch for them on their val lists
    (best_control/); the test stage reports clip_two_tower+reranker beside avg_reranker."""
    root = stage_inputs
    data_dir = root / "retriever_data"
    captions = {}
    for split in ("train", "val", "test"):
        for line in open(data_dir / f"{split}.jsonl"):
            r = json.loads(line)
            captions.setdefault(r["image_id"], []).append(r["query"])
    for split in ("val", "test"):
        for line in open(root / f"run_{split}.jsonl"):
            r = json.loads(line)
            captions.setdefault(r["gold"], []).append(r["query"])
    ids = sorted(json.loads((data_dir / "gallery_train.json").read_text())) + sorted(
        json.loads((data_dir / "gallery_val.json").read_text())) + sorted(json.loads((data_dir / "gallery_test.json").read_text()))
    write_emb(tmp_path / "emb", ids, lambda i: list(dict.fromkeys(captions.get(i, []))))
    data = tmp_path / "reranker_data"
    meta = prepare_dataset.main(prepare_args(root, data, "--train-candidates", "clip", "--emb-dir", str(tmp_path / "emb")))
    assert set(meta["control"]) == {"val", "test"}
    store = FeatureStore.load(tmp_path / "emb")
    gallery = sorted(json.loads((data_dir / "gallery_test.json").read_text()))
    for lst in load_lists(data / "control" / "test.jsonl"):  # the two-tower's top-k, exactly
        cos = store.images(gallery) @ store.texts([{"gold": lst["gold"], "query": lst["query"]}])[0]
        assert lst["candidates"] == [gallery[j] for j in np.argsort(-cos, kind="stable")[:len(lst["candidates"])]]
        assert lst["scores"] == pytest.approx(sorted(cos.tolist(), reverse=True)[:len(lst["candidates"])], abs=1e-5)
        assert not lst["inserted"]
    none = prepare_dataset.main(prepare_args(root, tmp_path / "plain", "--train-candidates", "clip", "--emb-dir",
                                             str(tmp_path / "emb"), "--control", "none"))
    assert "control" not in none and not (tmp_path / "plain" / "control").exists()
    feats = ["--emb-dir", str(tmp_path / "emb")]
    res = train.main(train_args(root, data, tmp_path / "rr", *feats, "--late-interaction", "--embed-fusion", "learned",
                                "--fusion", "val", "--epochs", "2"))
    assert res["best_control_epoch"] is not None and (tmp_path / "rr" / "best_control" / saving.META_FILE).is_file()
    lines = [json.loads(x) for x in open(tmp_path / "rr" / "metrics.jsonl")]
    assert sum("eval/control_val/R@1" in x for x in lines) == 3  # epochs 0, 1, 2
    m = rerank_test.main(["--reranker-dir", str(tmp_path / "rr" / "best"), "--data-dir", str(data),
                          "--out-dir", str(tmp_path / "rr_test"), "--retriever-name", "toy"])
    control = json.loads((tmp_path / "rr_test" / "metrics_control_test.json").read_text())
    assert control["system"] == "clip_two_tower+reranker" and control["reranker_dir"].endswith("best_control")
    assert m["control"]["R@1"] == control["R@1"] and (tmp_path / "rr_test" / "run_control_test.jsonl").is_file()
    before = json.loads((tmp_path / "rr_test" / "metrics_clip_two_tower_top3_test.json").read_text())
    assert before["R@1"] == meta["control"]["test"]["retriever_metrics"]["R@1"]  # the two-tower's own order
