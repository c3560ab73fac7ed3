"""tools/compare_runs.py: the numbers and results of two stage roots, timings and run ids left out."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(o) + "\n" for o in obj))
    else:
        path.write_text(json.dumps(obj))


def _tree(root: Path, *, ranked=("a", "b"), r1=11.4, seconds=3.0):
    t5, rerank_test = "train_retriever_t5_stage2", "test_reranker_llama"
    _write(root / t5 / "eval" / "metrics_test.json", {"R@1": r1, "eval_seconds": seconds, "system": "avg_t5_stage2",
                                                      "loss": float("nan")})
    _write(root / t5 / "eval" / "run_test.jsonl", [{"qid": 0, "query": "a red circle", "gold": "a", "ranked": list(ranked),
                                                    "scores": [0.5, 0.25]}])
    _write(root / t5 / "metrics.jsonl", [{"step": 1, "train/loss": 2.0, "time": seconds, "train/s_per_step": seconds}])
    _write(root / rerank_test / "metrics_train_retriever_t5_stage2_top50_test.json", {"R@1": r1})
    _write(root / "finetune_reranker_llama" / "stage.json", {"run_id": str(seconds)})


def _run(a: Path, b: Path):
    return subprocess.run([sys.executable, "tools/compare_runs.py", str(a), str(b)], cwd=ROOT, capture_output=True, text=True)


def test_same_results_with_other_timings_compare_equal(tmp_path):
    _tree(tmp_path / "old", seconds=3.0)
    _tree(tmp_path / "new", seconds=9.0)  # other timings and run ids: still equal
    r = _run(tmp_path / "old", tmp_path / "new")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("4 files, 12 values compared: 0 differences")


def test_a_changed_ranking_or_number_or_missing_file_is_named(tmp_path):
    _tree(tmp_path / "old")
    _tree(tmp_path / "ranked", ranked=("b", "a"))
    r = _run(tmp_path / "old", tmp_path / "ranked")
    assert r.returncode == 1 and "run_test.jsonl line 1 /ranked[0]: a vs b" in r.stdout and "2 differences" in r.stdout
    _tree(tmp_path / "r1", r1=11.5)
    r = _run(tmp_path / "old", tmp_path / "r1")
    assert r.returncode == 1 and "metrics_test.json /R@1: 11.4 vs 11.5" in r.stdout
    (tmp_path / "r1" / "train_retriever_t5_stage2" / "metrics.jsonl").unlink()
    r = _run(tmp_path / "old", tmp_path / "r1")
    assert "train_retriever_t5_stage2/metrics.jsonl: missing" in r.stdout
    assert _run(tmp_path / "old", tmp_path / "nowhere").returncode == 2
    (tmp_path / "r1" / "train_retriever_t5_stage2" / "eval" / "run_test.jsonl").write_text('{"qid": 0}\n{"qid": \n')
    r = _run(tmp_path / "r1", tmp_path / "old")
    assert r.returncode == 2 and "run_test.jsonl: line 2 is not valid JSON" in r.stderr
