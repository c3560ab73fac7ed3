"""End to end through the real bash stage scripts and config plumbing, on the tiny generated dataset.

Runs prepare_emb -> CLIP baseline -> train_rqvae -> generate_codes -> prepare_retriever_dataset ->
T5 stage 1 -> T5 stage 2 -> report with a throwaway config, so a broken script, a flag that no
longer exists or a contract mismatch between stages fails here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import TINY_T5_FLAGS, stage_script_env
from conftest import run_checked as _run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tiny_demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    t5_dir = work / "t5"
    env = stage_script_env(
        tiny_demo, work, CODE_LEN=2, CODEBOOK_SIZE=8, RQ_EPOCHS=3, RQ_BATCH_SIZE=16,
        RQ_ARGS="--latent-dim 16 --hidden-dims 32 --kmeans-samples 24",
        RETRIEVER_MODEL=t5_dir, T5_EPOCHS=1, T5_BATCH_SIZE=16, BEAM=5,
        STAGE2_EPOCHS=1, STAGE2_MAX_TRAIN_QUERIES=32, DIS_BEAMS=3,
        T5_ARGS="--eval-train-queries 0 --eval-batch-size 8")
    _run([sys.executable, "tools/make_demo_t5.py", "--annotations", tiny_demo.json_path, "--out-dir", t5_dir,
          *TINY_T5_FLAGS], env)
    for script in ("prepare_emb.sh", "eval_clip_baseline.sh", "train_rqvae.sh", "generate_codes.sh",
                   "prepare_retriever_dataset.sh", "train_retriever_t5.sh", "train_retriever_t5_stage2.sh"):
        _run(["bash", f"scripts/{script}", *(["--num-workers", "0"] if script == "prepare_emb.sh" else [])], env)
    report = _run([sys.executable, "-m", "avg.eval.report", str(work / "out" / "demo")], env)
    return work / "out" / "demo", report.stdout


def test_every_stage_writes_its_contract(pipeline):
    root, _ = pipeline
    for rel in ("emb/index.json", "emb/image_features.npy", "clip_baseline/metrics_clip_test.json",
                "rqvae/model.safetensors", "rqvae/config.json", "rqvae/checkpoints/last.pt",
                "codes/codes.json", "codes/codebook.npy", "codes/stats.json",
                "retriever_data/train.jsonl", "retriever_data/gallery_test.json",
                "retriever_t5/best/voken_vocab.json", "retriever_t5/eval/metrics_test.json",
                "retriever_t5_stage2/eval/metrics_test.json", "results.csv"):
        assert (root / rel).is_file(), rel


def test_codes_cover_every_image_and_collisions_are_reported(pipeline, tiny_demo):
    root, _ = pipeline
    codes = json.loads((root / "codes" / "codes.json").read_text())
    images = json.loads(tiny_demo.json_path.read_text())["images"]
    assert set(codes["images"]) == {im["filename"] for im in images}
    stats = json.loads((root / "codes" / "stats.json").read_text())
    distinct = len({tuple(v["code"]) for v in codes["images"].values()})
    assert stats["raw_collision_rate"] == pytest.approx(1 - distinct / len(images))  # raw codes (the default)
    assert codes["num_levels"] == 2 and codes["codebook_size"] == 8 and codes["code_len"] == 2
    assert set(stats["ceiling"]) == {"val", "test"}


def test_test_captions_stay_out_of_training_and_metrics_are_per_query(pipeline):
    root, report = pipeline
    train = [json.loads(x) for x in (root / "retriever_data" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (root / "retriever_data" / "test.jsonl").read_text().splitlines()]
    assert not ({q["image_id"] for q in train} & {q["image_id"] for q in test})
    for rel in ("clip_baseline/metrics_clip_test.json", "retriever_t5/eval/metrics_test.json",
                "retriever_t5_stage2/eval/metrics_test.json"):
        m = json.loads((root / rel).read_text())
        assert m["num_queries"] == len(test) == 40 and 0 <= m["R@1"] <= m["R@5"] <= m.get("R@10", m["R@5"]) <= 100
    assert "avg_t5_stage2" in report and "clip_two_tower" in report
