"""Stage 1 / stage 2 training end to end on a tiny T5 and a tiny synthetic dataset (CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from avg.artifacts.runfiles import read_run
from avg.retriever import t5
from avg.stages import prepare_retriever_dataset as prepare_dataset, train_retriever_t5 as train_t5
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
make_demo_t5 = load_tool("make_demo_t5")

COLORS = ("red", "blue", "green", "white", "black")
SHAPES = ("cube", "ball", "cone", "ring", "star", "disk", "tube")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """25 train / 5 val / 5 test images, 2 captions each, random unique codes (M=2, N=6, +disambiguation)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")
    mp.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("t5run")
    rng = np.random.default_rng(0)
    images, codes = [], {}
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    flat = rng.permutation(6 * 6)
    for i in range(35):
        split = "train" if i < 25 else ("val" if i < 30 else "test")
        c, s = pairs[i]
        name = f"img{i}.jpg"
        images.append({"filename": name, "split": split,
                       "sentences": [{"raw": f"a {c} {s} on a table"}, {"raw": f"the {s} is {c}"}]})
        codes[name] = {"code": [int(flat[i]) // 6, int(flat[i]) % 6, 0], "split": split}
    (root / "dataset.json").write_text(json.dumps({"images": images}))
    cdir = root / "codes"
    cdir.mkdir()
    (cdir / "codes.json").write_text(json.dumps({
        "num_levels": 2, "codebook_size": 6, "shared_codebook": False, "code_len": 3, "disambiguation": True,
        "disambiguation_size": 2, "tie_rule": "none", "encoder": {}, "images": codes}))
    np.save(cdir / "codebook.npy", rng.normal(size=(2, 6, 8)).astype(np.float32))
    prepare_dataset.main(["--annotations", str(root / "dataset.json"), "--codes-dir", str(cdir),
                          "--out-dir", str(root / "data")])
    texts = [s["raw"] for im in images if im["split"] == "train" for s in im["sentences"]]
    make_demo_t5.make_demo_t5(texts, root / "t5", vocab_size=40, d_model=32, num_layers=1, num_heads=2, d_ff=64)
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def stage1(assets):
    """One uninterrupted 2-epoch stage-1 run, shared by the tests below."""
    out = assets / "run_a"
    return out, train_t5.main(common(assets, out))


def common(root, out, *extra):
    return ["--data-dir", str(root / "data"), "--codes-dir", str(root / "codes"), "--model", str(root / "t5"),
            "--out-dir", str(out), "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--num-beams", "5",
            "--eval-batch-size", "8", "--eval-train-queries", "10", "--seed", "0", "--log-every", "2", *extra]


def test_stage1_writes_best_metrics_and_runs(stage1):
    out_a, res = stage1
    assert res["global_step"] == 2 * 7  # 50 queries / batch 8 -> 7 steps per epoch
    for f in ("best/config.json", "best/voken_vocab.json", "best/best.json", "best/tokenizer_config.json",
              "eval/metrics_test.json", "eval/run_test.jsonl", "eval/run_val_epoch1.jsonl",
              "eval/run_val_epoch2.jsonl", "eval/run_train_epoch2.jsonl", "checkpoints/last/train_state.json",
              "metrics.jsonl", "train.log"):
        assert (out_a / f).is_file(), f
    test_metrics = json.loads((out_a / "eval/metrics_test.json").read_text())
    assert test_metrics["num_queries"] == 10 and test_metrics["gallery_size"] == 5
    run = read_run(out_a / "eval/run_test.jsonl")
    assert len(run) == 10 and all(len(r.ranked) == len(set(r.ranked)) <= 5 for r in run)
    assert all(set(r.ranked) <= {f"img{i}.jpg" for i in range(30, 35)} for r in run)  # test gallery only
    logged = [json.loads(line) for line in (out_a / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/val/R@1" in r for r in logged) and any("train/loss" in r for r in logged)
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    assert losses[-1] < losses[0]  # it learns something
    best = json.loads((out_a / "best/best.json").read_text())
    assert best["selected_by"] == "eval/val/R@1" and best["epoch"] in (1, 2)


def test_resume_mid_epoch_gives_identical_weights(assets, stage1):
    out_a, _ = stage1
    timing = ("eval_seconds", "queries_per_s")
    strip = lambda m: {k: v for k, v in m.items() if k not in timing}  # noqa: E731
    test_metrics = strip(json.loads((out_a / "eval/metrics_test.json").read_text()))
    # interrupted mid-epoch (step 5 of 7), then resumed: identical final weights and metrics
    out_b = assets / "run_b"
    part = train_t5.main(common(assets, out_b, "--stop-after-steps", "5"))
    assert part["global_step"] == 5 and not (out_b / "eval/metrics_test.json").exists()
    rest = train_t5.main(common(assets, out_b, "--resume"))
    assert rest["steps_this_run"] == 9
    wa = load_file(out_a / "checkpoints/last/model.safetensors")
    wb = load_file(out_b / "checkpoints/last/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert strip(json.loads((out_b / "eval/metrics_test.json").read_text())) == test_metrics


def test_stage2_from_stage1_best(assets, stage1):
    out1, _ = stage1
    out2 = assets / "run_s2"
    args = ["--stage", "2", "--init-from", str(out1 / "best"), "--data-dir", str(assets / "data"),
            "--out-dir", str(out2), "--epochs", "1", "--batch-size", "8", "--dis-beams", "4",
            "--dis-weight", "0.5", "--num-beams", "5", "--eval-train-queries", "0", "--log-every", "1", "--seed", "0"]
    res = train_t5.main(args)
    # 50 training queries of 10 images, searched in chunks as large as the 5-image val gallery:
    # batches of 8 never mix chunks, so there are more than ceil(50 / 8) = 7 steps
    assert res["global_step"] > 7
    logged = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    dis = [r["train/dis_loss"] for r in logged if "train/dis_loss" in r]
    assert len(dis) == res["global_step"] and all(np.isfinite(dis)) and all(d >= 0 for d in dis)
    assert (out2 / "best/voken_vocab.json").is_file() and (out2 / "eval/metrics_test.json").is_file()
    log = (out2 / "train.log").read_text()
    assert "chunk(s) of ~5 training images" in log and "evaluating the starting model (epoch 0)" in log
    # the starting model was evaluated: best/ is the better of epoch 0 and epoch 1 on val
    best = json.loads((out2 / "best/best.json").read_text())
    vals = [r["eval/val/R@1"] for r in logged if "eval/val/R@1" in r]
    assert len(vals) == 2 and best["metrics"]["eval/val/R@1"] == max(vals)


def test_stage2_reuses_the_recorded_val_evaluation_of_its_start_only_when_it_is_the_same(assets, stage1):
    """Stage 1 records in best.json a digest of what its val evaluation depended on; stage 2 with the same
    val settings takes that evaluation (metrics and run file) as its epoch 0 instead of running it again,
    and --reeval-start, which runs it, gives the same run file and metrics. Other settings: evaluated."""
    out1, _ = stage1
    info = json.loads((out1 / "best/best.json").read_text())
    assert len(info["val_signature"]) == 40
    base = ["--stage", "2", "--init-from", str(out1 / "best"), "--data-dir", str(assets / "data"), "--epochs", "1",
            "--batch-size", "8", "--dis-beams", "4", "--num-beams", "5", "--eval-batch-size", "8",
            "--eval-train-queries", "0", "--seed", "0", "--skip-test"]
    reused, again = assets / "run_s2_reuse", assets / "run_s2_reeval"
    train_t5.main([*base, "--out-dir", str(reused)])
    train_t5.main([*base, "--out-dir", str(again), "--reeval-start"])
    assert "the one" in (reused / "train.log").read_text() and "recorded" in (reused / "train.log").read_text()
    assert "evaluating the starting model (epoch 0)" in (again / "train.log").read_text()
    start = f"eval/run_val_epoch{info['epoch']}.jsonl"
    assert (reused / "eval/run_val_epoch0.jsonl").read_bytes() == (out1 / start).read_bytes()
    assert (again / "eval/run_val_epoch0.jsonl").read_bytes() == (out1 / start).read_bytes()

    def epoch0(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith("eval/val/")} for r in rows if r.get("epoch") == 0][0]
    assert epoch0(reused) == epoch0(again) == {k: v for k, v in info["metrics"].items() if k.startswith("eval/val/")}
    # an evaluation draws nothing from the training's RNG: the same weights whether epoch 0 was reused or run
    wa, wb = (load_file(out / "checkpoints/last/model.safetensors") for out in (reused, again))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # a different search setting is a different evaluation: run, not reused
    other = assets / "run_s2_beam4"
    train_t5.main([*base[:base.index("--num-beams")], "--num-beams", "4", *base[base.index("--num-beams") + 2:],
                   "--out-dir", str(other)])
    assert "evaluating the starting model (epoch 0)" in (other / "train.log").read_text()


def test_val_signature_follows_queries_gallery_features_and_settings():
    import argparse

    from avg.search.gallery import Gallery

    args = argparse.Namespace(num_beams=5, score="children", fast_search=False, max_source_length=64, eval_batch_size=8)
    q = [{"query": "a red cube", "image_id": "a"}, {"query": "a blue ball", "image_id": "b"}]
    g = Gallery(["a", "b"], [[0, 1], [1, 0]])
    f = torch.ones(2, 3)
    sig = t5.val_signature(args, q, g, f, "no", 1)
    assert sig == t5.val_signature(args, [dict(x) for x in q], Gallery(["a", "b"], [[0, 1], [1, 0]]), f.clone(), "no", 1)
    changed = [t5.val_signature(args, q[:1], g, f, "no", 1),
               t5.val_signature(args, q, Gallery(["a", "b"], [[0, 1], [1, 1]]), f, "no", 1),
               t5.val_signature(args, q, Gallery(["a", "b"], [[0, 1], [1, 0]], seed=3), f, "no", 1),
               t5.val_signature(args, q, g, f * 2, "no", 1),
               t5.val_signature(args, q, g, None, "no", 1),
               t5.val_signature(args, q, g, f, "bf16", 1),
               t5.val_signature(args, q, g, f, "no", 2),
               t5.val_signature(argparse.Namespace(**{**vars(args), "score": "vocab"}), q, g, f, "no", 1)]
    assert len(set(changed)) == len(changed) and sig not in changed


def test_stage2_on_a_seeded_subset_of_training_queries(assets, stage1):
    out1, _ = stage1
    args = ["--stage", "2", "--init-from", str(out1 / "best"), "--data-dir", str(assets / "data"),
            "--epochs", "1", "--batch-size", "8", "--dis-beams", "4", "--num-beams", "5",
            "--eval-train-queries", "0", "--seed", "0", "--max-train-queries", "16", "--skip-test"]
    res = train_t5.main(args + ["--out-dir", str(assets / "run_s2_subset")])
    assert res["global_step"] >= 2  # 16 of 50 queries / batch 8, batches within one gallery chunk
    log = (assets / "run_s2_subset" / "train.log").read_text()
    assert "seeded subset of 16 of 50 training queries" in log


def test_evaluate_split_ranks_images_not_codes(assets, stage1):
    """Two test images given the same code: both are listed, each at its own rank, never a double hit."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from avg.metrics import recall_ks, retrieval_metrics
    from avg.retriever.data import load_queries
    from avg.retriever.evaluate import evaluate_split
    from avg.search.gallery import Gallery
    from avg.retriever.vocab import VokenVocab

    out_a, _ = stage1
    tok = AutoTokenizer.from_pretrained(out_a / "best")
    model = AutoModelForSeq2SeqLM.from_pretrained(out_a / "best")
    vocab = VokenVocab.load(out_a / "best", tok)
    mapping = json.loads((assets / "data" / "gallery_test.json").read_text())
    mapping["img31.jpg"] = mapping["img30.jpg"]  # a collision
    gallery = Gallery.from_mapping(mapping, seed=3)
    queries = load_queries(assets / "data" / "test.jsonl")
    records, metrics = evaluate_split(model, tok, vocab, queries, gallery, num_beams=5, batch_size=3, device="cpu",
                                      show_progress=False)
    assert metrics == retrieval_metrics(records, ks=recall_ks(5), gallery_size=5)
    pair = gallery.images_for(mapping["img30.jpg"])
    for r in records:
        assert len(r["ranked"]) == len(set(r["ranked"])) == 5  # 4 codes -> 5 images
        i, j = r["ranked"].index(pair[0]), r["ranked"].index(pair[1])
        assert j == i + 1 and r["scores"][i] == r["scores"][j]  # adjacent, seeded order, shared score
    hits_at_1 = sum(r["ranked"][0] == r["gold"] for r in records)
    assert metrics["R@1"] == pytest.approx(100 * hits_at_1 / len(records))
    assert [r["qid"] for r in records] == list(range(len(queries)))


@pytest.fixture(scope="module")
def emb_data(assets):
    """Random CLIP-like features for every image and caption (prepare_emb/) and retriever data that points into them."""
    from avg.artifacts.emb import save_emb

    images = json.loads((assets / "dataset.json").read_text())["images"]
    caps, rng = [], np.random.default_rng(1)
    for r, im in enumerate(images):
        caps += [{"text": s["raw"], "image_row": r, "split": im["split"]} for s in im["sentences"]]
    feats = rng.normal(size=(len(caps), 6)).astype(np.float32)
    save_emb(assets / "emb", feats[: len(images)], feats, [{"image_id": im["filename"], "file": im["filename"],
             "split": im["split"]} for im in images], caps, {"model": "toy", "normalized": False})
    data = assets / "data_q"
    prepare_dataset.main(["--annotations", str(assets / "dataset.json"), "--codes-dir", str(assets / "codes"),
                          "--emb-dir", str(assets / "emb"), "--out-dir", str(data)])
    return data, caps


def test_query_prefix_retriever_reads_the_clip_feature_end_to_end(assets, stage1, emb_data):
    """prepare_dataset --emb-dir records each caption's feature row; --query-prefix trains a retriever that
    reads it, saves the prefix beside the model, tests with it and continues into stage 2; the scores
    and diagnostics are those of the children score; data without feature rows is refused by name."""
    from avg.retriever.prefix import PREFIX_CONFIG, PREFIX_WEIGHTS
    from avg.retriever.t5 import load_t5_retriever
    from avg.core.io import InputError

    data, caps = emb_data
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    assert all(caps[r["text_row"]]["text"] == r["query"] for r in rows)
    out = assets / "run_q"
    args = ["--data-dir", str(data), "--codes-dir", str(assets / "codes"), "--model", str(assets / "t5"),
            "--out-dir", str(out), "--epochs", "1", "--batch-size", "8", "--lr", "3e-3", "--num-beams", "5",
            "--eval-batch-size", "8", "--eval-train-queries", "4", "--seed", "0", "--query-prefix", "2"]
    res = train_t5.main(args)
    assert res["test"]["query_prefix"] == 2 and res["test"]["score"] == "children"
    assert (out / "best" / PREFIX_WEIGHTS).is_file() and (out / "best" / PREFIX_CONFIG).is_file()
    r = load_t5_retriever(out / "best")
    assert r.needs_features and r.prefix.num_tokens == 2 and r.normalize == "children"
    diag = json.loads((out / "eval" / "diagnostics_test.json").read_text())
    assert len(diag["positions"]) == 3 and diag["num_queries"] == 10 and set(diag["fit"]) == {"val", "train"}
    # the code R@1 given the gold's first vokens ran through the query prefix too, and can only rise with t
    given = diag["given_prefix"]
    assert [g["position"] for g in given] == [1, 2] and all(g["num_queries"] == 10 for g in given)
    assert 0 <= given[0]["code_r1"] <= given[1]["code_r1"] <= 100 and given[0]["codes"] >= given[1]["codes"] >= 1
    s2 = train_t5.main(["--stage", "2", "--init-from", str(out / "best"), "--data-dir", str(data), "--out-dir",
                        str(assets / "run_q2"), "--epochs", "1", "--batch-size", "8", "--dis-beams", "3", "--num-beams", "5",
                        "--eval-train-queries", "0", "--seed", "0", "--dis-lists", "found"])
    assert s2["test"]["query_prefix"] == 2
    with pytest.raises(InputError, match="built without --emb-dir"):
        train_t5.main([*common(assets, assets / "run_q3"), "--query-prefix", "2"])
    assert not (assets / "run_q3").exists()
    with pytest.raises(InputError, match="was trained without a query prefix"):
        train_t5.main(["--stage", "2", "--init-from", str(stage1[0] / "best"), "--data-dir", str(data), "--out-dir",
                       str(assets / "run_q4"), "--epochs", "1", "--query-prefix", "2"])



def test_clip_teacher_in_both_stages_end_to_end(assets, emb_data):
    """--gen-teacher-mix trains stage 1 (no query prefix: the teacher reads prepare_emb/ on its own) and stage 2 with
    --dis-teacher-mix too; the teacher changes the trained weights; bad settings are refused before writing."""
    from avg.core.io import InputError

    data, _ = emb_data
    base = ["--data-dir", str(data), "--codes-dir", str(assets / "codes"), "--model", str(assets / "t5"), "--epochs", "1",
            "--batch-size", "8", "--lr", "3e-3", "--num-beams", "5", "--eval-batch-size", "8", "--eval-train-queries", "0",
            "--seed", "0", "--sample-queries", "0"]
    plain = train_t5.main([*base, "--out-dir", str(assets / "run_t0")])
    taught = train_t5.main([*base, "--out-dir", str(assets / "run_t1"), "--gen-teacher-mix", "0.5", "--teacher-scale", "5"])
    assert "CLIP teacher" not in (assets / "run_t0" / "train.log").read_text()
    assert "CLIP teacher (scale 5.0, 25 training images)" in (assets / "run_t1" / "train.log").read_text()
    w0 = load_file(str(assets / "run_t0" / "best" / "model.safetensors"))
    w1 = load_file(str(assets / "run_t1" / "best" / "model.safetensors"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert plain["test"]["num_queries"] == taught["test"]["num_queries"] == 10
    s2 = train_t5.main(["--stage", "2", "--init-from", str(assets / "run_t1" / "best"), "--data-dir", str(data),
                        "--out-dir", str(assets / "run_t2"), "--epochs", "1", "--batch-size", "8", "--dis-beams", "3",
                        "--num-beams", "5", "--eval-train-queries", "0", "--seed", "0", "--sample-queries", "0",
                        "--log-every", "1", "--gen-teacher-mix", "0.5", "--dis-teacher-mix", "0.5"])
    assert s2["test"]["stage"] == 2
    logged = [json.loads(x) for x in (assets / "run_t2" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/teacher_top_is_positive" in m for m in logged)
    with pytest.raises(InputError, match="needs --score children"):
        train_t5.main([*base, "--out-dir", str(assets / "run_t3"), "--gen-teacher-mix", "0.5", "--score", "vocab"])
    with pytest.raises(InputError, match=r"--dis-teacher-mix must be in \[0, 1\]"):
        train_t5.main([*base, "--out-dir", str(assets / "run_t3"), "--dis-teacher-mix", "2"])
    with pytest.raises(InputError, match="built without --emb-dir"):
        train_t5.main([*common(assets, assets / "run_t3"), "--gen-teacher-mix", "0.5"])
    assert not (assets / "run_t3").exists()


def test_mixed_precision_defaults_to_bf16_where_supported_and_refuses_fp16_for_t5():
    from avg.train.loop import choose_precision, resolve_mixed_precision
    from avg.core.io import InputError

    assert resolve_mixed_precision("auto", cpu=True, t5=True) == "no"  # the CPU trains in fp32
    assert choose_precision("auto", cuda=True, bf16_ok=True, t5=True) == "bf16"
    assert choose_precision("auto", cuda=True, bf16_ok=False, t5=True) == "no"  # no bf16: fp32 (+ TF32), never fp16
    assert choose_precision("auto", cuda=False, bf16_ok=False) == "no"
    with pytest.raises(InputError, match="T5 overflows in fp16"):
        choose_precision("fp16", cuda=True, bf16_ok=True, t5=True)
    assert choose_precision("fp16", cuda=True, bf16_ok=True, t5=True, allow_fp16=True) == "fp16"
    assert choose_precision("fp16", cuda=True, bf16_ok=True) == "fp16"  # decoder-only LMs may use it
