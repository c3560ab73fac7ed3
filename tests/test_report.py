import json

import pandas as pd

from avg.experiments.report import collect_metrics, main, to_markdown


def test_collects_known_metrics_and_ignores_others(tmp_path, capsys):
    (tmp_path / "eval_clip_baseline").mkdir()
    (tmp_path / "eval_clip_baseline" / "metrics_clip_test.json").write_text(json.dumps({"system": "CLIP", "split": "test", "R@1": 30.0, "R@5": 60.0, "R@10": 70.0, "mean_rank": 9.5, "num_queries": 50}))
    (tmp_path / "t5" / "eval").mkdir(parents=True)
    (tmp_path / "t5" / "eval" / "metrics_test.json").write_text(json.dumps({"split": "test", "R@1": 40.0, "R@5": 65.0, "R@10": 71.0}))
    (tmp_path / "t5" / "metrics.json").write_text(json.dumps({"loss": 1.0}))
    (tmp_path / ".tmp_stage").mkdir()
    (tmp_path / ".tmp_stage" / "metrics.json").write_text(json.dumps({"R@1": 99.0}))
    (tmp_path / "generate_codes").mkdir()
    (tmp_path / "generate_codes" / "stats.json").write_text(json.dumps({"num_images": 10, "raw_collision_rate": 0.1}))
    df = collect_metrics(tmp_path)
    assert list(df["system"]) == ["CLIP", "t5/eval"]
    assert list(df["R@1"]) == [30.0, 40.0]
    assert "| CLIP | test | 30.00 | 60.00 | 70.00 |  | 9.50 | 50 |" in to_markdown(df)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "raw_collision_rate=0.1" in out
    assert (tmp_path / "results.csv").read_text().startswith("system,split,R@1")


def test_missing_dir_is_an_error(tmp_path):
    assert main([str(tmp_path / "nope")]) == 2


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def _fake_output_dir(root):
    """A small output dir: CLIP baseline, a T5 retriever, a beam-size study, an efficiency csv, logs."""
    _write(root / "generate_codes" / "stats.json", {"raw_collision_rate": 0.25, "splits": {"test": {"collision_rate": 0.06}}})
    _write(root / "eval_clip_baseline" / "metrics_clip_test.json", {"system": "clip_two_tower", "split": "test", "R@1": 14.0, "R@5": 40.0, "R@10": 52.0, "mean_rank": 150.0, "num_queries": 5000, "queries_per_s": 9000.0})
    _write(root / "train_retriever_t5" / "eval" / "metrics_test.json", {"system": "avg_t5_stage1", "split": "test", "R@1": 8.0, "R@5": 27.0, "R@10": 38.0, "mean_rank": 470.0, "num_queries": 5000, "num_beams": 20, "queries_per_s": 40.0})
    # a grid study with its own codes (the nearest stats.json wins) and no split-level rate
    _write(root / "grid" / "beam" / "generate_codes" / "stats.json", {"raw_collision_rate": 0.5})
    for b, r1 in ((5, 6.0), (10, 7.0), (20, 8.0)):
        _write(root / "grid" / "beam" / f"b{b}" / "metrics.json", {"system": "avg_t5", "split": "val", "R@1": r1, "R@5": r1 + 10, "R@10": r1 + 20, "num_beams": b, "study": "beam", "variant": f"b{b}"})
    lines = [json.dumps({"step": s, "train/loss": 5.0 / s}) for s in (1, 2, 3)] + [json.dumps({"step": 3, "eval/val/R@1": 7.5})]
    _write(root / "train_retriever_t5" / "metrics.jsonl", "\n".join(lines) + "\n")
    rows = ["gallery_size,system,mode,batch_size,queries_per_s,time_boxed"]
    for n in (1000, 10000):
        rows += [f"{n},avg,batch1,1,{30 - n / 1000},False", f"{n},avg,batch,32,{100 - n / 1000},False",
                 f"{n},clip_fp32,batch1,1,{400 - n / 100},False", f"{n},clip_fp32,batch,32,{900 - n / 100},{n == 10000}"]
    _write(root / "efficiency" / "efficiency.csv", "\n".join(rows) + "\n")


def test_columns_collision_rate_throughput_and_plots(tmp_path, capsys):
    _fake_output_dir(tmp_path)
    assert "avg_t5" not in set(collect_metrics(tmp_path)["system"])  # grid rows live in the grid's own tables
    df = collect_metrics(tmp_path, grid=True).set_index("system")
    assert pd.isna(df.loc["clip_two_tower", "collision_rate"])  # not a generative system
    assert df.loc["avg_t5_stage1", "collision_rate"] == 0.06  # the test split's raw rate, from <root>/codes
    grid = df.loc["avg_t5"]
    assert list(grid["collision_rate"]) == [0.5, 0.5, 0.5]  # the grid's own generate_codes/stats.json
    assert sorted(grid["stage"]) == ["grid/beam/b10", "grid/beam/b20", "grid/beam/b5"]
    assert df.loc["avg_t5_stage1", "stage"] == "train_retriever_t5" and df.loc["clip_two_tower", "queries_per_s"] == 9000.0
    md = to_markdown(collect_metrics(tmp_path))
    assert "| avg_t5_stage1 | test | 8.00 | 27.00 | 38.00 |  | 470.00 | 5000 |  | 6.0% | 40.00 | beam 20 | train_retriever_t5 |" in md
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("recall_vs_beam.png", "throughput_vs_gallery.png", "training_curves.png"):
        png = tmp_path / "plots" / name
        assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
        assert f"plots/{name}" in out and f"(plots/{name})" in (tmp_path / "results.md").read_text()
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header == ("system,split,R@1,R@5,R@10,R@20,mean_rank,num_queries,list_R@k,collision_rate,queries_per_s,"
                      "setting,stage,file")


def test_reranker_ceiling_setting_and_diagnostics_tables(tmp_path):
    _write(tmp_path / "generate_codes" / "stats.json", {"raw_collision_rate": 0.2, "ceiling": {"test": {
        "decoded_codes": {"R@1": 13.5, "R@5": 39.0, "R@10": 51.0, "R@20": 62.5},
        "image_features": {"R@1": 14.8, "R@5": 40.0, "R@10": 52.2, "R@20": 64.0}}}})
    diag = {"positions": [{"position": 1, "gold_is_top": 58.9}, {"position": 2, "gold_is_top": 39.2}],
            "first_miss": {"1": 41.6, "2": 37.2, "same_code": 21.2}, "r1_unique_code": 11.96, "r1_shared_code": 8.53,
            "queries_shared_code": 375, "fit": {"train": {"R@1": 12.5}, "val": {"R@1": 11.38}},
            "given_prefix": [{"position": 1, "code_r1": 20.5, "codes": 9.1}]}
    _write(tmp_path / "train_retriever_t5" / "eval" / "metrics_test.json", {
        "system": "avg_t5_stage1", "split": "test", "R@1": 11.7, "R@5": 34.9, "R@10": 47.5, "R@20": 59.4,
        "score": "children", "query_prefix": 4, "num_beams": 50, "diagnostics": diag})
    _write(tmp_path / "rerank_embed" / "metrics_test.json", {
        "system": "x+embed_rerank", "split": "test", "R@1": 14.8, "R@5": 40.0, "R@10": 51.0, "list_recall": 75.0,
        "topk": 50, "fusion_weight": 0.0})
    df = collect_metrics(tmp_path).set_index("system")
    assert df.loc["x+embed_rerank", "list_R@k"] == "75.00 (k=50)" and df.loc["avg_t5_stage1", "R@20"] == 59.4
    assert df.loc["avg_t5_stage1", "setting"] == "score=children, query prefix 4, beam 50"
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "| test | 13.50 / 39.00 / 51.00 / 62.50 | 14.80 / 40.00 / 52.20 / 64.00 |" in md
    assert ("| avg_t5_stage1 (train_retriever_t5) | 58.9 / 39.2 | 20.5 | 1: 41.6, 2: 37.2, same_code: 21.2 | 11.96 / 8.53 "
            "(375 q shared) | 12.50 / 11.38 |") in md


def test_plots_are_skipped_quietly_without_data(tmp_path):
    # one metrics file, one beam size, no efficiency csv, no metrics.jsonl: no plot, no error
    _write(tmp_path / "t5" / "eval" / "metrics_test.json", {"split": "test", "R@1": 1.0, "num_beams": 20})
    assert main([str(tmp_path)]) == 0
    assert not (tmp_path / "plots").exists()
    assert "![" not in (tmp_path / "results.md").read_text()


def test_one_row_per_system_the_test_stage_wins(tmp_path, capsys):
    """The LLaMA trainer's own test of best/ and test_retriever_llama report the same system: one row, the later
    stage's (it tests the saved model on the whole split), and the other file named below the table."""
    _write(tmp_path / "finetune_retriever_llama" / "eval" / "metrics_test.json",
           {"system": "avg_llama", "split": "test", "R@1": 1.0, "num_queries": 500})
    _write(tmp_path / "test_retriever_llama" / "metrics_test.json",
           {"system": "avg_llama", "split": "test", "R@1": 2.0, "num_queries": 5000})
    _write(tmp_path / "test_retriever_llama_val" / "metrics_val.json",
           {"system": "avg_llama", "split": "val", "R@1": 3.0, "num_queries": 5000})
    df = collect_metrics(tmp_path)
    assert sorted(zip(df["split"], df["R@1"])) == [("test", 2.0), ("val", 3.0)]
    assert df.attrs["duplicates"] == ["finetune_retriever_llama/eval/metrics_test.json"]
    assert main([str(tmp_path)]) == 0
    assert "also reported by" in capsys.readouterr().out
