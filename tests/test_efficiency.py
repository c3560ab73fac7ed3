"""Efficiency benchmark: gallery scaling on tiny sizes, both systems' outputs, the timing loop, main()."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avg.experiments import efficiency as eff, scaling, systems as S, timing
from avg.retriever.t5 import T5Retriever
from avg.artifacts.emb import save_emb
from avg.core.io import write_json
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
make_demo_t5 = load_tool("make_demo_t5")

N_REAL, DIM = 24, 16


def _real(seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(N_REAL, DIM)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    flat = rng.permutation(6 * 6)[:N_REAL]
    codes = np.stack([flat // 6, flat % 6, np.arange(N_REAL) % 2], axis=1).astype(np.int64)
    ids = [f"img{i}" for i in range(N_REAL)]
    return ids, feats, codes


@pytest.mark.parametrize("size", [1, 7, 24, 25, 60])
def test_scale_gallery_sizes_unique_codes_unit_features(size):
    ids, feats, codes = _real()
    g = scaling.scale_gallery(ids, feats, codes, size, first=5, noise_std=0.1, seed=3)
    assert len(g.image_ids) == len(set(g.image_ids)) == size
    assert g.features.shape == (size, DIM) and g.codes.shape == (size, 3)
    assert g.num_real == min(size, N_REAL)
    np.testing.assert_allclose(np.linalg.norm(g.features, axis=1), 1.0, atol=1e-5)
    assert len({tuple(c) for c in g.codes.tolist()}) == size  # real codes are unique, new ones never repeat
    assert g.image_ids[:min(size, 5)] == ids[:min(size, 5)]  # the query split's images come first
    for d in range(3):  # new codes only use values the real codes use at that position
        assert set(g.codes[:, d].tolist()) <= set(codes[:, d].tolist())
    if size > N_REAL:
        synth = g.features[N_REAL:]
        assert not np.isin(synth, feats).all(axis=1).any()  # perturbed, not copied
        # each synthetic row stays close to some real row (noise of norm ~0.1)
        assert (synth @ feats.T).max(axis=1).min() > 0.9


def test_scaling_is_seeded():
    ids, feats, codes = _real()
    a = scaling.scale_gallery(ids, feats, codes, 50, seed=1)
    b = scaling.scale_gallery(ids, feats, codes, 50, seed=1)
    c = scaling.scale_gallery(ids, feats, codes, 50, seed=2)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.features, b.features)
    assert not np.array_equal(a.codes, c.codes)


def test_new_codes_refuse_an_exhausted_code_space():
    _, _, codes = _real()
    # 6 x 6 x 2 = 72 possible codes, 24 taken: 48 new ones exist, 49 do not
    new = scaling.sample_new_codes(codes, 48, np.random.default_rng(0))
    assert len({tuple(c) for c in new.tolist()} | {tuple(c) for c in codes.tolist()}) == 72
    with pytest.raises(ValueError, match="only 48 new codes"):
        scaling.sample_new_codes(codes, 49, np.random.default_rng(0))


class _HashEncoder:
    """A deterministic stand-in for a CLIP text tower (the real one is used in test_main_end_to_end)."""

    def encode_texts(self, texts):
        out = torch.stack([torch.tensor(np.random.default_rng(sum(map(ord, t))).normal(size=DIM), dtype=torch.float32)
                           for t in texts])
        return torch.nn.functional.normalize(out, dim=-1)


def _tiny_retriever(path=None):
    from avg.retriever.vocab import VokenVocab

    texts = ["a red cube", "the blue ball", "a green cone on a table", "two stars"]
    tok = make_demo_t5.train_tokenizer(texts, vocab_size=40)
    model = make_demo_t5.build_model(len(tok), d_model=32, num_layers=1, num_heads=2, d_ff=64)
    vocab = VokenVocab(num_levels=2, codebook_size=6, shared_codebook=False, disambiguation=True, disambiguation_size=2)
    vocab.add_to(tok, model, None, init="random", seed=0)
    if path is not None:
        model.save_pretrained(path)
        tok.save_pretrained(path)
        write_json(vocab.to_dict(), Path(path) / "voken_vocab.json")
    return model.eval(), tok, vocab


def test_both_systems_return_ranked_ids_and_the_timing_loop_runs():
    ids, feats, codes = _real()
    g = scaling.scale_gallery(ids, feats, codes, 30, seed=0)
    model, tok, vocab = _tiny_retriever()
    cpu = torch.device("cpu")
    gen = S.GenerativeSystem(T5Retriever(model, tok, vocab, None, "vocab"), cpu, num_beams=4)
    two = S.TwoTowerSystem(_HashEncoder(), cpu, k=4, precision="fp32")
    texts = ["a red cube", "two stars", "the ball"]
    for system in (gen, two):
        assert system.set_gallery(g.image_ids, g.codes, g.features) >= 0
        assert system.structure_bytes > 0
        ranked = system.search(texts)
        assert len(ranked) == 3
        for r in ranked:
            assert len(r) == 4 and len(set(r)) == 4 and set(r) <= set(g.image_ids) and all(isinstance(x, str) for x in r)
    # two-tower: exact search, the best image is the arg-max of the inner product
    q = _HashEncoder().encode_texts(texts).numpy()
    assert [r[0] for r in two.search(texts)] == [g.image_ids[j] for j in (q @ g.features.T).argmax(1)]
    assert two.structure_bytes == 30 * DIM * 4
    res, out = timing.time_search(two.search, texts * 3, 2, max_seconds=60, warmup=1, device=cpu)
    assert res["queries_timed"] == 9 and not res["time_boxed"] and len(out) == 9 and res["queries_per_s"] > 0
    res, out = timing.time_search(gen.search, texts * 3, 1, max_seconds=0.0, warmup=0, device=cpu)
    assert res["queries_timed"] == 1 and res["time_boxed"] and len(out) == 1  # time box: one call, then stop
    # the whole pipeline: the same beams, re-ordered by the CLIP cosine of query and candidate
    both = S.GenerativeSystem(T5Retriever(model, tok, vocab, None, "vocab"), cpu, num_beams=4,
                                text_encoder=_HashEncoder(), rerank_k=4)
    both.set_gallery(g.image_ids, g.codes, g.features)
    assert both.name == "avg+embed_rerank"
    row = {i: r for r, i in enumerate(g.image_ids)}
    for plain, rr, qv in zip(gen.search(texts), both.search(texts), q):
        assert sorted(plain) == sorted(rr)
        cos = [float(g.features[row[i]] @ qv) for i in rr]
        assert cos == sorted(cos, reverse=True)
    with pytest.raises(ValueError, match="CLIP text encoder"):
        S.GenerativeSystem(T5Retriever(model, tok, vocab, None, "vocab"), cpu, rerank_k=4)
    assert gen.precision == "fp32" and S.retriever_dtype("auto", cpu) == torch.float32
    # bf16 weights (the GPU default): the same search runs, and the rows say which precision was timed
    model16, tok16, vocab16 = _tiny_retriever()
    gen16 = S.GenerativeSystem(T5Retriever(model16, tok16, vocab16, None, "vocab"), cpu, num_beams=4, dtype=torch.bfloat16)
    gen16.set_gallery(g.image_ids, g.codes, g.features)
    assert gen16.precision == "bf16" and next(gen16.model.parameters()).dtype == torch.bfloat16
    assert all(len(r) == 4 and set(r) <= set(g.image_ids) for r in gen16.search(texts))
    with pytest.raises(ValueError, match="retriever dtype"):
        S.GenerativeSystem(T5Retriever(model16, tok16, vocab16, None, "vocab"), cpu, dtype=torch.float16)


class _ReverseStep:
    """A stand-in LM reranking step (the real one is tested against the reranker's test stage in
    test_reranker_features): reverses each list; covers only the images it was told about."""

    needs_features = True  # it reads the query's CLIP feature, so the system encodes the query

    def __init__(self, known):
        self.known, self.calls = set(known), []

    def covers(self, image_ids):
        return all(i in self.known for i in image_ids)

    def rerank(self, queries, candidates, scores, query_features=None):
        self.calls.append((list(queries), [list(c) for c in candidates], [list(x) for x in scores], query_features))
        return [(list(c)[::-1], list(x)[::-1]) for c, x in zip(candidates, scores)]


def test_lm_rerank_step_gets_the_top_k_and_is_skipped_where_it_lacks_inputs():
    ids, feats, codes = _real()
    g = scaling.scale_gallery(ids, feats, codes, 30, seed=0)
    model, tok, vocab = _tiny_retriever()
    cpu = torch.device("cpu")
    texts = ["a red cube", "two stars"]
    gen = S.GenerativeSystem(T5Retriever(model, tok, vocab, None, "vocab"), cpu, num_beams=4)
    gen.set_gallery(g.image_ids, g.codes, g.features)
    step = _ReverseStep(ids)
    lm = S.GenerativeSystem(T5Retriever(model, tok, vocab, None, "vocab"), cpu, num_beams=4,
                              text_encoder=_HashEncoder(), rerank_k=3, lm_step=step)
    assert lm.name == "avg+lm_rerank" and lm.knob == "rerank_k"
    assert lm.supports(ids) and not lm.supports(g.image_ids)  # the synthetic images have no reranker inputs
    lm.set_gallery(ids, codes, feats)
    gen.set_gallery(ids, codes, feats)
    got = lm.search(texts)
    queries, cands, scores, q = step.calls[-1]
    assert queries == texts and [c for c in cands] == [r[:3] for r in gen.search(texts)]
    assert all(len(x) == 3 for x in scores) and q.shape == (2, DIM)  # the retriever's scores and the CLIP query
    assert got == [c[::-1] for c in cands]
    with pytest.raises(ValueError, match="rerank_k"):
        S.GenerativeSystem(T5Retriever(model, tok, vocab, None, "vocab"), cpu, text_encoder=_HashEncoder(),
                             lm_step=step)
    queries = [{"query": "a red cube", "gold": "img0"}, {"query": "two stars", "gold": "img1"}]
    rows = timing.benchmark([gen, lm], {"image_ids": ids, "features": feats, "codes": codes, "first": 4}, queries,
                         [10, len(ids) + 5], batch_size=2, max_seconds=30, warmup=0, noise_std=0.1, seed=0, device=cpu,
                         progress=False)
    timed = {(r["gallery_size"], r["system"]) for r in rows}
    assert (10, "avg+lm_rerank") in timed and (len(ids) + 5, "avg+lm_rerank") not in timed
    assert (len(ids) + 5, "avg") in timed


def test_benchmark_rows_cover_sizes_systems_modes():
    ids, feats, codes = _real()
    model, tok, vocab = _tiny_retriever()
    cpu = torch.device("cpu")
    systems = [S.GenerativeSystem(T5Retriever(model, tok, vocab, None, "children"), cpu, num_beams=3),
               S.TwoTowerSystem(_HashEncoder(), cpu, k=3, precision="fp32"),
               S.TwoTowerSystem(_HashEncoder(), cpu, k=3, precision="fp16")]
    queries = [{"query": "a red cube", "gold": "img0"}, {"query": "two stars", "gold": "img1"}]
    logged = []
    rows = timing.benchmark(systems, {"image_ids": ids, "features": feats, "codes": codes, "first": 4}, queries, [10, 30],
                         batch_size=2, max_seconds=30, warmup=1, noise_std=0.1, seed=0, device=cpu, progress=False,
                         log=lambda m, s: logged.append((s, m)))
    assert len(rows) == 2 * 3 * 2 and [s for s, _ in logged] == [0, 1]
    assert {(r["gallery_size"], r["system"], r["mode"]) for r in rows} == {
        (n, s, m) for n in (10, 30) for s in ("avg", "clip_fp32", "clip_fp16") for m in ("batch1", "batch")}
    fp = {r["gallery_size"]: r["structure_mb"] for r in rows if r["system"] == "clip_fp16"}
    assert fp[30] == pytest.approx(30 * DIM * 2 / 2**20)
    assert all(r["queries_timed"] == 2 and r["depth"] == 3 for r in rows)


def test_main_end_to_end(tmp_path, monkeypatch):
    """The CLI on tiny real artifacts: a random open_clip checkpoint, prepare_emb/, generate_codes/, a saved retriever."""
    import open_clip

    from avg.models.clip import register_clip_configs
    from avg.models.demo_clip import save_open_clip_checkpoint

    monkeypatch.setenv("WANDB_MODE", "disabled")
    register_clip_configs()
    torch.manual_seed(0)
    clip, _, _ = open_clip.create_model_and_transforms("avg-demo-vit", pretrained=None)
    ckpt = save_open_clip_checkpoint(clip, tmp_path / "clip.pt", extra={"model": "avg-demo-vit"})
    dim = int(clip.text_projection.shape[1])
    ids, _, codes = _real()
    rng = np.random.default_rng(0)
    img = rng.normal(size=(N_REAL, dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    splits = ["test"] * 6 + ["train"] * (N_REAL - 6)
    captions = [{"text": f"caption {i} of a red cube", "image_row": i, "split": s} for i, s in enumerate(splits)]
    save_emb(tmp_path / "emb", img, img.copy(), [{"image_id": i, "file": f"{i}.png", "split": s} for i, s in zip(ids, splits)],
             captions, encoder={"backend": "open_clip", "model": "avg-demo-vit", "pretrained": str(ckpt), "normalized": True})
    (tmp_path / "codes").mkdir()
    write_json({"num_levels": 2, "codebook_size": 6, "shared_codebook": False, "code_len": 3, "disambiguation": True,
                "disambiguation_size": 2, "tie_rule": "none", "encoder": {},
                "images": {i: {"code": c, "split": s} for i, c, s in zip(ids, codes.tolist(), splits)}},
               tmp_path / "codes" / "codes.json")
    _tiny_retriever(tmp_path / "retriever")
    out = tmp_path / "efficiency"
    args = ["--retriever-dir", str(tmp_path / "retriever"), "--emb-dir", str(tmp_path / "emb"), "--codes-dir",
            str(tmp_path / "codes"), "--out-dir", str(out), "--gallery-sizes", "6,40", "--num-queries", "4",
            "--batch-size", "2", "--num-beams", "3", "--max-seconds", "5", "--warmup", "1", "--device", "cpu",
            "--no-progress", "--rerank-topk", "3"]
    result = eff.main(args)
    with open(out / "efficiency.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result["rows"])
    systems = {"avg", "avg+embed_rerank", "clip_fp32", "clip_fp16", "ivf_flat", "ivf_pq", "hnsw"}
    assert {r["system"] for r in rows} == systems  # + the ANN baselines over the same features
    default = [r for r in rows if r["default_knob"] == "True"]
    assert len(default) == 2 * len(systems) * 2  # sizes x systems x (batch 1, batched)
    hnsw = sorted(int(r["knob_value"]) for r in rows if r["system"] == "hnsw" and r["mode"] == "batch" and r["gallery_size"] == "40")
    assert hnsw == [16, 32, 64, 128, 256]  # its recall-throughput curve
    assert (out / "curves.png").stat().st_size > 1000 and (out / "scale.csv").is_file()
    assert set(rows[0]) == set(eff.CSV_COLUMNS)
    assert {r["gallery_size"] for r in rows} == {"6", "40"} and all(r["time_boxed"] == "False" for r in rows)
    assert json.loads((out / "efficiency.json").read_text())["device"]["type"] == "cpu"
    assert (out / "efficiency.png").stat().st_size > 1000
    assert json.loads((out / "stage.json").read_text())["status"] == "complete"
    # another configuration in the same out dir is refused unless --force
    from avg.core.io import InputError

    with pytest.raises(InputError, match="stage.json"):
        eff.main(args[:-3] + ["--num-beams", "2", "--no-progress"])
    with pytest.raises(InputError, match="--rerank-topk"):
        eff.main(args[:-2] + ["--lm-reranker-dir", str(tmp_path / "retriever")])
