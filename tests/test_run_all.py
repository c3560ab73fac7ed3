"""scripts/run_all.sh on the tiny generated dataset: stage selection, --dry-run, the per-stage times
file, skipping of up-to-date stages on a second run, and a failing stage stopping the run by name.
(Every stage script itself runs end to end in tests/test_e2e_scripts.py; only cheap stages here.)"""
from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from conftest import stage_script_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tiny_demo, tmp_path_factory):
    return stage_script_env(tiny_demo, tmp_path_factory.mktemp("run_all"), DEMO_TOOLS=0)


def _run_all(env, *args, timeout=300):
    return subprocess.run(["bash", "scripts/run_all.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _times(root: Path) -> list[dict]:
    with open(root / "run_times.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_help_lists_every_stage_in_order():
    res = subprocess.run(["bash", "scripts/run_all.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0
    order = ["demo_assets", "prepare_emb", "eval_clip_baseline", "train_rqvae", "generate_codes",
             "prepare_retriever_dataset", "demo_t5", "train_retriever_t5", "train_retriever_t5_stage2", "demo_llama",
             "finetune_retriever_llama", "test_retriever_llama", "prepare_reranker_dataset", "convert_voken_to_seed",
             "finetune_reranker_llama", "test_reranker_llama", "report"]
    pos = [res.stdout.index(f"  {s}\n") for s in order]
    assert pos == sorted(pos)


def test_dry_run_lists_and_runs_nothing(env):
    out = Path(env["OUT_DIR"]) / "dry"
    res = _run_all(dict(env, OUT_DIR=str(out)), "--dry-run", "--skip", "train_retriever_t5_stage2")
    assert res.returncode == 0, res.stderr
    assert "prepare_emb" in res.stdout and "not run" in res.stdout and "$ bash scripts/prepare_emb.sh" in res.stdout
    assert "train_retriever_t5_stage2" not in res.stdout and "demo_assets" not in res.stdout  # --skip, DEMO_TOOLS=0
    for s in ("prepare_reranker_dataset", "finetune_reranker_llama"):
        if not (ROOT / "scripts" / f"{s}.sh").is_file():
            assert f"{s}.sh does not exist yet" in res.stdout
    assert not out.exists()
    forced = _run_all(dict(env, OUT_DIR=str(out)), "--dry-run", "--force", "--stages", "train_rqvae")
    assert "--force" in forced.stdout and "prepare_emb" not in forced.stdout


def test_unknown_stage_is_refused(env):
    res = _run_all(env, "--stages", "prepare_emb,nonsense")
    assert res.returncode == 2 and "unknown stage 'nonsense'" in res.stderr


def test_failing_stage_stops_with_its_name(env):
    out = Path(env["OUT_DIR"]) / "fail"
    bad = dict(env, OUT_DIR=str(out), ANNOTATIONS=str(out / "missing.json"))
    res = _run_all(bad, "--stages", "prepare_emb,report")
    assert res.returncode != 0
    assert "missing.json" in res.stderr and "stage prepare_emb FAILED" in res.stderr
    assert "=== [run_all] report" not in res.stdout  # nothing after the failing stage ran
    rows = _times(out / "demo")
    assert [(r["stage"], r["status"]) for r in rows] == [("prepare_emb", "failed")]


def test_runs_stages_then_skips_them_when_up_to_date(env):
    root = Path(env["OUT_DIR"]) / "demo"
    first = _run_all(env, "--stages", "prepare_emb,report")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    rows = _times(root)
    assert [r["stage"] for r in rows] == ["prepare_emb", "report"]
    assert all(r["status"] == "ran" for r in rows) and all(int(r["seconds"]) >= 0 for r in rows)
    assert (root / "prepare_emb" / "index.json").is_file()
    if not (root / "prepare_emb" / "stage.json").is_file():
        pytest.skip("prepare_emb does not write a stage manifest yet: nothing to skip on")
    run_id = json.loads((root / "prepare_emb" / "stage.json").read_text())["run_id"]
    second = _run_all(env, "--stages", "prepare_emb,report")
    assert second.returncode == 0, second.stderr[-2000:]
    status = {r["stage"]: r["status"] for r in _times(root)}
    assert status == {"prepare_emb": "up to date", "report": "ran"}
    assert json.loads((root / "prepare_emb" / "stage.json").read_text())["run_id"] == run_id


@pytest.mark.parametrize("dataset", ["flickr30k", "coco"])
def test_real_configs_stop_without_a_gpu_unless_allowed(dataset):
    import os

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check passes")
    env = {**os.environ, "DATASET": dataset, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("ALLOW_CPU", None)
    env.pop("AVG_GPU_CHECKED", None)
    cmd = ["bash", "-c", "source scripts/common.sh && echo sourced"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "sourced" not in res.stdout
    assert f"configs/{dataset}.sh expects a GPU, but torch sees no CUDA device" in res.stderr and "ALLOW_CPU=1" in res.stderr
    res = subprocess.run(cmd, cwd=ROOT, env={**env, "ALLOW_CPU": "1"}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "sourced" in res.stdout
    demo = subprocess.run(cmd, cwd=ROOT, env={**env, "DATASET": "demo"}, capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0  # the demo config runs on the CPU by design
