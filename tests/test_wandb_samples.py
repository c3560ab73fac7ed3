"""The sample-query table: files for offline users always, a wandb.Table only when wandb runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from avg.data.sample_tables import log_sample_table, pick_samples, resolve_image_paths
from avg.core.tracking import RunLogger


def _images(root: Path, n: int = 6) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i in range(n):
        p = root / f"im{i}.png"
        Image.new("RGB", (200, 120), (40 * i, 255 - 40 * i, 90)).save(p)
        paths[f"im{i}.png"] = str(p)
    return paths


def _records(n: int = 10) -> list[dict]:
    out = []
    for q in range(n):
        gold = f"im{q % 6}.png"
        ranked = [f"im{(q + j) % 6}.png" for j in range(1, 6)]  # the gold image is absent ...
        if q % 3 == 0:
            ranked[2] = gold  # ... except for every third query, at rank 3
        out.append({"qid": q, "query": f"query number {q} | with a bar", "gold": gold, "ranked": ranked, "scores": [0.0] * 5})
    return out


def test_pick_samples_is_seeded_and_records_hit_ranks():
    recs = _records()
    a, b = pick_samples(recs, 4, 5, seed=1), pick_samples(recs, 4, 5, seed=1)
    assert a == b and len(a) == 4 and [s["qid"] for s in a] == sorted(s["qid"] for s in a)
    assert pick_samples(recs, 4, 5, seed=2) != a
    assert all(s["hit_rank"] == (3 if s["qid"] % 3 == 0 else None) for s in pick_samples(recs, 10, 5, seed=0))
    assert len(pick_samples(recs, 50, 2, seed=0)[0]["top"]) == 2


def test_disabled_wandb_writes_only_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    paths = _images(tmp_path / "images")
    out = tmp_path / "eval"
    logger = RunLogger(out, run_name="t")
    try:
        assert logger.wandb_run is None
        samples = log_sample_table(logger, _records(), paths, n=4, topk=5, seed=0, out_dir=out, name="test")
    finally:
        logger.finish()
    assert len(samples) == 4
    data = json.loads((out / "samples_test.json").read_text())
    assert [s["qid"] for s in data["samples"]] == [s["qid"] for s in samples]
    assert data["samples"][0]["gold_path"] == paths[data["samples"][0]["gold"]]
    md = (out / "samples_test.md").read_text()
    assert md.count("\n| query number") == 4 and "\\|" in md  # one row per sample, pipes escaped
    assert 'src="../images/im' in md  # image links relative to the markdown file
    assert not (out / "wandb").exists()
    # no logger at all, no image paths: still the files, ids instead of thumbnails
    log_sample_table(None, _records(), {}, n=2, out_dir=tmp_path / "bare", name="val")
    assert "`im" in (tmp_path / "bare" / "samples_val.md").read_text()


def test_offline_wandb_logs_a_table_with_thumbnails(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    paths = _images(tmp_path / "images")
    out = tmp_path / "eval"
    logger = RunLogger(out, run_name="samples-test")
    if logger.wandb_run is None:
        logger.finish()
        pytest.fail("wandb offline did not start")
    logged = []
    real_log = logger.wandb_run.log
    logger.wandb_run.log = lambda data, *a, **k: (logged.append(data), real_log(data, *a, **k))
    try:
        log_sample_table(logger, _records(), paths, n=3, topk=5, seed=0, out_dir=out, name="test", thumb_size=32)
    finally:
        logger.finish()
    import wandb

    assert len(logged) == 1 and list(logged[0]) == ["eval/test/samples"]
    table = logged[0]["eval/test/samples"]
    assert isinstance(table, wandb.Table) and table.columns[:4] == ["qid", "query", "gold_id", "gold"]
    assert len(table.data) == 3
    row = dict(zip(table.columns, table.data[0]))
    assert row["query"].startswith("query number") and row["hit_rank"] in (3, -1)
    thumbs = [row[c] for c in ("gold", "top1", "top5")]
    assert all(isinstance(t, wandb.Image) and max(t.image.size) <= 32 for t in thumbs)  # thumbnails, not originals
    assert row["top1_id"] == row["top1"]._caption
    # the offline run holds the table (wandb 0.31 keeps the thumbnails in the table's run artifact)
    tables = list((out / "wandb").rglob("samples_*.table.json"))
    assert len(tables) == 1 and len(json.loads(tables[0].read_text())["data"]) == 3
    assert (out / "samples_test.md").is_file()


def test_resolve_image_paths(tmp_path):
    data = tmp_path / "out" / "retriever_data"
    data.mkdir(parents=True)
    (tmp_path / "out" / "prepare_emb").mkdir()
    (tmp_path / "out" / "prepare_emb" / "index.json").write_text(json.dumps({
        "source": {"image_root": "imgs"}, "images": [{"image_id": "a.png", "file": "test/a.png", "split": "test"}]}))
    assert resolve_image_paths(data_dir=str(data)) == {"a.png": "imgs/test/a.png"}
    assert resolve_image_paths(data_dir=str(data), image_root="/x") == {"a.png": "/x/test/a.png"}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"filename": "b.png", "filepath": "sub", "split": "test",
                                           "sentences": [{"raw": "a cat"}]}]}))
    (data / "meta.json").write_text(json.dumps({"sources": {"annotations": str(ann)}}))
    assert resolve_image_paths(data_dir=str(data), image_root=str(tmp_path)) == {"b.png": str(tmp_path / "sub" / "b.png")}
    assert resolve_image_paths(data_dir=str(tmp_path / "nowhere")) == {}
