"""The multi-seed table: mean ± std per system and paired differences, against hand computations."""
from __future__ import annotations

import json
import os
import subprocess

import pandas as pd
import pytest

from avg.experiments import seeds as S


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_mean_std_and_paired_differences(tmp_path, capsys):
    r1 = {"0": (10.0, 11.0), "1": (12.0, 12.5), "2": (11.0, 12.5)}  # stage 1, stage 2 per seed
    shared = tmp_path / "main" / "eval_clip_baseline"  # the shared baseline, linked into every seed as run_seeds.sh does
    _write(shared / "metrics_test.json", {"system": "clip", "split": "test", "R@1": 14.0, "R@5": 40.0, "R@10": 52.0})
    for s, (a, b) in r1.items():
        root = tmp_path / f"seed_{s}" / "demo"
        root.mkdir(parents=True)
        (root / "eval_clip_baseline").symlink_to(os.path.relpath(shared, root))
        _write(root / "train_retriever_t5" / "eval" / "metrics_test.json",
               {"system": "avg_t5_stage1", "split": "test", "R@1": a, "R@5": 30.0, "R@10": 40.0, "R@20": 50.0})
        _write(root / "train_retriever_t5_stage2" / "eval" / "metrics_test.json",
               {"system": "avg_t5_stage2", "split": "test", "R@1": b, "R@5": 31.0, "R@10": 41.0, "R@20": 51.0})
        _write(root / "test_reranker_llama" / "metrics_test.json",
               {"system": "avg_reranker", "split": "test", "R@1": b + 3, "R@5": 35.0, "R@10": 45.0, "list_recall": 70.0,
                "topk": 50})
        _write(root / "test_reranker_llama" / "metrics_retriever_top50_test.json",  # the lists' own order
               {"system": "retriever_top50", "split": "test", "R@1": b - 0.5 * int(s), "R@5": 31.0, "R@10": 41.0})
    assert S.main([str(tmp_path), "--dataset", "demo", "--seeds", "0", "1", "2"]) == 0
    summary = {r["system"]: r for r in pd.read_csv(tmp_path / "demo" / "results_seeds.csv").to_dict(orient="records")}
    assert summary["clip"]["seeds"] == 3 and summary["clip"]["R@1 std"] == 0.0  # read through the links
    assert summary["avg_t5_stage1"]["R@1 mean"] == pytest.approx(11.0)
    assert summary["avg_t5_stage1"]["R@1 std"] == pytest.approx(1.0)  # sample std of 10, 12, 11
    assert summary["avg_reranker"]["list_recall mean"] == pytest.approx(70.0) and summary["avg_t5_stage2"]["seeds"] == 3
    md = (tmp_path / "demo" / "results_seeds.md").read_text()
    # stage 2 - stage 1 per seed: +1.0, +0.5, +1.5 -> +1.00 ± 0.50
    assert "| stage 2 − stage 1 | 3 | +1.00 ± 0.50 | +1.00 +0.50 +1.50 |" in md
    assert "| LM reranker − its input | 3 | +3.00 ± 0.00 |" in md
    assert "| avg_t5_stage1 | train_retriever_t5 | test | 3 | 11.00 ± 1.00 |" in capsys.readouterr().out
    assert "its list order" not in md  # the reranker is already paired with its input
    # without the retriever's own rows, the reranker is paired with the order of its lists:
    # +3.0, +3.5, +4.0 -> +3.50 ± 0.50
    for s in r1:
        for stage in ("train_retriever_t5", "train_retriever_t5_stage2"):
            (tmp_path / f"seed_{s}" / "demo" / stage / "eval" / "metrics_test.json").unlink()
    assert S.main([str(tmp_path), "--dataset", "demo", "--seeds", "0", "1", "2"]) == 0
    md = (tmp_path / "demo" / "results_seeds.md").read_text()
    assert "| avg_reranker − its list order (test_reranker_llama) | 3 | +3.50 ± 0.50 | +3.00 +3.50 +4.00 |" in md
    assert S.main([str(tmp_path), "--seeds", "0", "9"]) == 2  # a missing seed is an error


def test_run_seeds_needs_the_shared_features(tmp_path):
    env = dict(os.environ, OUT_DIR=str(tmp_path / "out"), DATASET="demo", SEEDS="0")
    res = subprocess.run(["bash", "scripts/run_seeds.sh", "--dry-run"], cwd=os.path.dirname(os.path.dirname(__file__)),
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "emb is missing: run scripts/demo.sh" in res.stderr
