"""The experiment grid on the tiny generated dataset: a main run made by run_all.sh, then the beam
study (two beam sizes, the trained T5 evaluated only) and the codebook-size study (two tiny N, each
training its own RQ-VAE, codes, data and T5 stage 1); a re-run skips the finished variants."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_T5_FLAGS, stage_script_env
from conftest import run_checked as _run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def main_run(tiny_demo, tmp_path_factory):
    """emb -> rqvae -> codes -> retriever_data -> T5 stage 1 on the tiny data, through run_all.sh."""
    work = tmp_path_factory.mktemp("grid")
    env = stage_script_env(
        tiny_demo, work, DEMO_TOOLS=0, CODE_LEN=2, CODEBOOK_SIZE=8, RQ_EPOCHS=2, RQ_BATCH_SIZE=16,
        RQ_ARGS="--latent-dim 16 --hidden-dims 32 --kmeans-samples 24 --eval-every 0",
        RETRIEVER_MODEL=work / "t5", T5_EPOCHS=1, T5_BATCH_SIZE=16, BEAM=5,
        T5_ARGS="--eval-train-queries 0 --eval-batch-size 8")
    _run([sys.executable, "tools/make_demo_t5.py", "--annotations", tiny_demo.json_path, "--out-dir", work / "t5",
          *TINY_T5_FLAGS], env)
    _run(["bash", "scripts/run_all.sh", "--stages",
          "prepare_emb,train_rqvae,generate_codes,prepare_retriever_dataset,train_retriever_t5"], env)
    return work / "out" / "demo", env


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_beam_study_evaluates_the_trained_t5_per_beam(main_run):
    root, env = main_run
    res = _run([sys.executable, "-m", "avg.experiments.grid", "beam", "--variants", "1,5", "--beam-model", "stage1"], env)
    grid = root / "grid" / "beam"
    rows = _rows(grid / "results.csv")
    assert [r["variant"] for r in rows] == ["beam1", "beam5"] and [int(r["num_beams"]) for r in rows] == [1, 5]
    for b in (1, 5):
        m = json.loads((grid / f"beam{b}" / "metrics_avg_t5_stage1_test.json").read_text())
        assert (m["study"], m["variant"], m["num_beams"], m["system"], m["split"]) == ("beam", f"beam{b}", b, "avg_t5_stage1", "test")
        assert m["num_queries"] == 40 and 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 100
        run = [json.loads(x) for x in (grid / f"beam{b}" / "demo" / "train_retriever_t5_eval" / "eval" / "run_test.jsonl").read_text().splitlines()]
        codes = json.loads((root / "prepare_retriever_dataset" / "gallery_test.json").read_text())
        # the beam bounds the distinct codes of each list (images sharing a code are listed together)
        assert max(len({tuple(codes[i]) for i in r["ranked"]}) for r in run) <= b
        # the trained model is linked from the main run, not retrained
        assert (grid / f"beam{b}" / "demo" / "train_retriever_t5").resolve() == (root / "train_retriever_t5").resolve()
    assert "| beam1 |" in (grid / "results.md").read_text() and "beam5" in res.stdout


def test_codebook_study_trains_each_variant_and_rerun_skips(main_run):
    root, env = main_run
    cmd = [sys.executable, "-m", "avg.experiments.grid", "codebook_size", "--variants", "8,16", "--reduced"]
    _run(cmd, env)
    grid = root / "grid" / "codebook_size"
    rows = _rows(grid / "results.csv")
    assert [r["variant"] for r in rows] == ["N8", "N16"] and [int(r["codebook_size"]) for r in rows] == [8, 16]
    assert all(0 <= float(r["raw_collision_rate"]) <= 1 for r in rows)
    for n in (8, 16):
        vroot = grid / f"N{n}" / "demo"
        codes = json.loads((vroot / "generate_codes" / "codes.json").read_text())
        assert codes["codebook_size"] == n  # each variant trained its own tokenizer ...
        assert (vroot / "prepare_emb").is_symlink() and (vroot / "prepare_emb").resolve() == (root / "prepare_emb").resolve()  # ... on shared features
        m = json.loads((grid / f"N{n}" / "metrics_avg_t5_stage1_test.json").read_text())
        assert (m["study"], m["variant"], m["num_beams"], m["codebook_size"]) == ("codebook_size", f"N{n}", 5, n)
    manifests = {n: json.loads((grid / f"N{n}" / "stage.json").read_text()) for n in (8, 16)}
    assert all(m["status"] == "complete" for m in manifests.values())

    t0 = time.time()
    res = _run(cmd, env)
    assert res.stdout.count("up to date, skipped") == 2, res.stdout
    assert time.time() - t0 < 30
    assert {n: json.loads((grid / f"N{n}" / "stage.json").read_text())["run_id"] for n in (8, 16)} == \
        {n: m["run_id"] for n, m in manifests.items()}
    assert [r["R@1"] for r in _rows(grid / "results.csv")] == [r["R@1"] for r in rows]


def test_changed_schedule_is_refused_without_force(main_run):
    root, env = main_run
    res = subprocess.run([sys.executable, "-m", "avg.experiments.grid", "codebook_size", "--variants", "8", "--no-reduced"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "stage.json" in res.stderr and "--force" in res.stderr


def test_dry_run_and_bad_variant(main_run):
    root, env = main_run
    res = _run([sys.executable, "-m", "avg.experiments.grid", "ablation", "--variants", "no_dis", "--dry-run"], env)
    assert "full" in res.stdout and "no_dis" in res.stdout  # no_dis needs the full variant's stage-1 model
    assert not (root / "grid" / "ablation").exists()
    bad = subprocess.run([sys.executable, "-m", "avg.experiments.grid", "ablation", "--variants", "nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'nope' is not a variant of ablation" in bad.stderr
