import json

from avg.eval.report import collect_metrics, main, to_markdown


def test_collects_known_metrics_and_ignores_others(tmp_path, capsys):
    (tmp_path / "clip_baseline").mkdir()
    (tmp_path / "clip_baseline" / "metrics_clip_test.json").write_text(json.dumps({"system": "CLIP", "split": "test", "R@1": 30.0, "R@5": 60.0, "R@10": 70.0, "mean_rank": 9.5, "num_queries": 50}))
    (tmp_path / "t5" / "eval").mkdir(parents=True)
    (tmp_path / "t5" / "eval" / "metrics_test.json").write_text(json.dumps({"split": "test", "R@1": 40.0, "R@5": 65.0, "R@10": 71.0}))
    (tmp_path / "t5" / "metrics.json").write_text(json.dumps({"loss": 1.0}))
    (tmp_path / ".tmp_stage").mkdir()
    (tmp_path / ".tmp_stage" / "metrics.json").write_text(json.dumps({"R@1": 99.0}))
    (tmp_path / "codes").mkdir()
    (tmp_path / "codes" / "stats.json").write_text(json.dumps({"num_images": 10, "raw_collision_rate": 0.1}))
    df = collect_metrics(tmp_path)
    assert list(df["system"]) == ["CLIP", "t5/eval"]
    assert list(df["R@1"]) == [30.0, 40.0]
    assert "| CLIP | test | 30.00 | 60.00 | 70.00 | 9.50 | 50 |" in to_markdown(df)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "raw_collision_rate=0.1" in out
    assert (tmp_path / "results.csv").read_text().startswith("system,split,R@1")


def test_missing_dir_is_an_error(tmp_path):
    assert main([str(tmp_path / "nope")]) == 2
