"""A new dataset is one file: a caption CSV turned into Karpathy json by tools/convert_captions.py, the template
configs/custom.sh (only its paths and models set), and run_all.sh takes it through the stages to a results table."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_T5_FLAGS, stage_script_env
from conftest import run_checked as _run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_csv_dataset_runs_through_the_stages_with_the_template(tiny_demo, tmp_path):
    data = tmp_path / "mine"
    rows = []
    for im in json.loads(tiny_demo.json_path.read_text())["images"]:
        rows += [{"image": f"{im['filepath']}/{im['filename']}", "caption": s["raw"], "split": im["split"]}
                 for s in im["sentences"]]
    data.mkdir()
    with open(data / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)
    _run([sys.executable, "tools/convert_captions.py", "--input", data / "captions.csv", "--output",
          data / "dataset_custom.json", "--image-root", tiny_demo.image_root], {})
    env = stage_script_env(tiny_demo, tmp_path, CODE_LEN=2, CODEBOOK_SIZE=8, RQ_EPOCHS=2, RQ_BATCH_SIZE=16,
                           RQ_ARGS="--latent-dim 16 --hidden-dims 32 --kmeans-samples 24", T5_EPOCHS=1, T5_BATCH_SIZE=16,
                           BEAM=5, T5_ARGS="--eval-train-queries 0 --eval-batch-size 8 --sample-queries 0",
                           EMB_BATCH_SIZE=16, EMB_ARGS="--num-workers 0")
    for var in ("DATA_DIR", "IMAGE_ROOT", "ANNOTATIONS"):  # the template's own paths, as a user edits them
        env.pop(var)
    config = (ROOT / "configs" / "custom.sh").read_text()
    config = config.replace("DATA_DIR=${DATA_DIR:-data/custom}", f"DATA_DIR=${{DATA_DIR:-{data}}}")
    config = config.replace("IMAGE_ROOT=${IMAGE_ROOT:-$DATA_DIR/images}", f"IMAGE_ROOT=${{IMAGE_ROOT:-{tiny_demo.image_root}}}")
    name = f"mine_{tmp_path.name}"
    cfg = ROOT / "configs" / f"{name}.sh"
    cfg.write_text(config)
    try:
        _run([sys.executable, "tools/make_demo_t5.py", "--annotations", data / "dataset_custom.json", "--out-dir",
              tmp_path / "t5", *TINY_T5_FLAGS], env)
        env.update(DATASET=name, ALLOW_CPU="1", CLIP_BACKEND="open_clip", CLIP_MODEL="avg-demo-vit",
                   RETRIEVER_MODEL=str(tmp_path / "t5"))
        res = subprocess.run(["bash", "scripts/run_all.sh", "--stages", "prepare_emb,eval_clip_baseline,train_rqvae,"
                              "generate_codes,prepare_retriever_dataset,train_retriever_t5,report"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        cfg.unlink()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    root = Path(env["OUT_DIR"]) / name
    table = (root / "results.csv").read_text()
    assert "clip_two_tower" in table and "avg_t5_stage1" in table
    manifest = json.loads((root / "prepare_emb" / "stage.json").read_text())
    assert manifest["recipe"] == "paper" and manifest["config"]["annotations"] == str(data / "dataset_custom.json")
    assert json.loads((root / "train_retriever_t5" / "stage.json").read_text())["config"]["score"] == "vocab"
