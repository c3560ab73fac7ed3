"""scripts/gpu_check.sh --dry-run: the GPU machine's first command runs every check on the CPU at tiny sizes and
prints one JSON object, the documented fields, on stdout and nothing else. (Its stage check runs under DeepSpeed
in tests/test_deepspeed.py.)"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZED = ("rqvae_real", "t5_stage1_real_bf16", "t5_stage1_real_fp32_tf32", "t5_stage2_real", "search_cuda_matches_cpu",
         "llama7b_lora", "llama7b_lora_checkpointing", "reranker_7b_mlp", "reranker_7b_grid", "efficiency_1k",
         "efficiency_10k")


@pytest.mark.slow
def test_dry_run_prints_one_json_summary_of_passing_checks():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--only", ",".join(SIZED)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads(res.stdout)  # the whole of stdout is the one object
    assert set(summary) == {"device", "dry_run", "versions", "checks", "seconds"} and summary["dry_run"] is True
    assert {"torch", "transformers", "accelerate", "peft"} <= set(summary["versions"])
    assert list(summary["checks"]) == list(SIZED)
    for name, check in summary["checks"].items():
        assert check["pass"] is True and check["seconds"] >= 0 and "peak_memory_gb" in check, (name, check)
    assert summary["checks"]["t5_stage1_real_bf16"]["s_per_step"] > 0
    assert summary["checks"]["llama7b_lora_checkpointing"]["trainable_weights"] > 0
    assert summary["checks"]["search_cuda_matches_cpu"]["queries_compared"] == 64
    for size in ("1k", "10k"):
        assert summary["checks"][f"efficiency_{size}"]["avg_queries_per_s"] > 0
        assert summary["checks"][f"efficiency_{size}"]["clip_exact_queries_per_s"] > 0


def test_a_failing_check_is_a_result_and_the_status_is_1(monkeypatch, capsys):
    from conftest import load_tool

    tool = load_tool("gpu_check")
    monkeypatch.setattr(tool, "check_rqvae", lambda ctx: (_ for _ in ()).throw(RuntimeError("no memory")))
    assert tool.main(["--dry-run", "--only", "rqvae_real,search_cuda_matches_cpu"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["checks"]["rqvae_real"] == {"pass": False, "error": "RuntimeError: no memory",
                                               "seconds": summary["checks"]["rqvae_real"]["seconds"],
                                               "peak_memory_gb": None}
    assert summary["checks"]["search_cuda_matches_cpu"]["pass"] is True
