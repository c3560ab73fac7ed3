"""End to end through the real bash stage scripts and config plumbing, on the tiny generated dataset.

Runs prepare_emb -> CLIP baseline -> train_rqvae -> generate_codes -> prepare_retriever_dataset ->
T5 stage 1 -> T5 stage 2 -> report with a throwaway config, so a broken script, a flag that no
longer exists or a contract mismatch between stages fails here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, env, timeout=300):
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def pipeline(tiny_demo, tmp_path_factory):
    import open_clip

    from avg.models.clip import register_clip_configs
    from avg.models.demo_clip import save_open_clip_checkpoint

    work = tmp_path_factory.mktemp("e2e")
    register_clip_configs()
    model, _, _ = open_clip.create_model_and_transforms("avg-demo-vit", pretrained=None)
    ckpt = save_open_clip_checkpoint(model, work / "clip.pt", extra={"model": "avg-demo-vit"})
    t5_dir = work / "t5"
    env = dict(os.environ)
    env.update({
        "DATASET": "demo", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "DATA_DIR": str(tiny_demo.out_dir), "IMAGE_ROOT": str(tiny_demo.image_root),
        "ANNOTATIONS": str(tiny_demo.json_path), "OUT_DIR": str(work / "out"),
        "CLIP_PRETRAINED": str(ckpt), "EMB_BATCH_SIZE": "16",
        "CODE_LEN": "2", "CODEBOOK_SIZE": "8", "RQ_EPOCHS": "3", "RQ_BATCH_SIZE": "16",
        "RQ_ARGS": "--latent-dim 16 --hidden-dims 32 --kmeans-samples 24",
        "RETRIEVER_MODEL": str(t5_dir), "T5_EPOCHS": "1", "T5_BATCH_SIZE": "16", "BEAM": "5",
        "STAGE2_EPOCHS": "1", "STAGE2_MAX_TRAIN_QUERIES": "32", "DIS_BEAMS": "3",
        "T5_ARGS": "--eval-train-queries 0 --eval-batch-size 8",
    })
    env.pop("VIRTUAL_ENV", None)
    _run([sys.executable, "tools/make_demo_t5.py", "--annotations", str(tiny_demo.json_path), "--out-dir", str(t5_dir),
          "--vocab-size", "300", "--d-model", "32", "--num-layers", "1", "--num-heads", "2", "--d-ff", "64"], env)
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


def test_codes_cover_every_image_and_are_unique(pipeline, tiny_demo):
    root, _ = pipeline
    codes = json.loads((root / "codes" / "codes.json").read_text())
    images = json.loads(tiny_demo.json_path.read_text())["images"]
    assert set(codes["images"]) == {im["filename"] for im in images}
    assert len({tuple(v["code"]) for v in codes["images"].values()}) == len(images)
    assert codes["num_levels"] == 2 and codes["codebook_size"] == 8


def test_test_captions_stay_out_of_training_and_metrics_are_per_query(pipeline):
    root, report = pipeline
    train = [json.loads(x) for x in (root / "retriever_data" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (root / "retriever_data" / "test.jsonl").read_text().splitlines()]
    assert not ({q["image_id"] for q in train} & {q["image_id"] for q in test})
    for rel in ("clip_baseline/metrics_clip_test.json", "retriever_t5/eval/metrics_test.json",
                "retriever_t5_stage2/eval/metrics_test.json"):
        m = json.loads((root / rel).read_text())
        assert m["num_queries"] == len(test) == 40 and 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 100
    assert "avg_t5_stage2" in report and "clip_two_tower" in report
