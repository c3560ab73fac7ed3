"""Kill a training run with SIGKILL mid-epoch, re-run the same command: it resumes and ends bit-for-bit
where an uninterrupted run ends (CPU, fixed seed). Real entry points in subprocesses, no racing sleeps:
the kill follows a polled checkpoint, and a run that finished before the kill fails the test."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from avg.artifacts.runfiles import read_run
from avg.artifacts.emb import save_emb
from avg.core.stages import read_manifest
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120
TIMING = ("per_s", "seconds", "time")  # wall-clock keys differ between any two runs


def _env() -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    return env


def _cmd(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def _start(cmd, log: Path) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, f"{' '.join(proc.args)} exited {rc}:\n{log.read_text()[-4000:]}"


def _kill_after(cmd, log: Path, marker: Path) -> None:
    """Start `cmd`, poll until `marker` (a checkpoint file, renamed into place) exists, SIGKILL it."""
    proc = _start(cmd, log)
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before writing {marker}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {marker} after {TIMEOUT}s")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _no_final_outputs(out: Path, finals: list[str]) -> None:
    done = [f for f in finals if (out / f).exists()]
    if done:
        pytest.fail(f"the run finished before the kill ({done} exist); make the test run longer")
    manifest = read_manifest(out)
    assert manifest is not None and manifest["status"] == "running"
    # a killed atomic write leaves only hidden temporary names, never a complete-looking file
    for p in out.rglob("*"):
        if p.name.endswith(".tmp"):
            assert p.name.startswith("."), p


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _drop_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


# ------------------------------------------------------------------------------------ RQ-VAE
def test_rqvae_killed_mid_epoch_resumes_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    n, dim = 3000, 32
    img = rng.normal(size=(n, dim))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img + 0.2 * rng.normal(size=img.shape)
    split = ["train" if i < 2800 else "val" for i in range(n)]
    images = [{"image_id": f"im{i}", "file": f"{i}.jpg", "split": split[i]} for i in range(n)]
    captions = [{"text": f"c{i}", "image_row": i, "split": split[i]} for i in range(n)]
    emb = save_emb(tmp_path / "emb", img.astype(np.float16), txt.astype(np.float16), images, captions,
                   {"backend": "synthetic", "model": "none", "pretrained": "", "normalized": True})
    flags = ["--emb-dir", emb, "--epochs", "4", "--batch-size", "16", "--latent-dim", "8", "--hidden-dims", "32",
             "--num-levels", "2", "--codebook-size", "16", "--kmeans-samples", "200", "--dead-code-threshold", "20",
             "--lr", "1e-3", "--seed", "3"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ref = _start(_cmd("avg.stages.train_rqvae", *flags, "--out-dir", straight), tmp_path / "straight.log")
    cmd = _cmd("avg.stages.train_rqvae", *flags, "--out-dir", killed)
    _kill_after(cmd, tmp_path / "killed.log", killed / "checkpoints" / "last" / "train_state.json")  # after epoch 1 of 4
    _no_final_outputs(killed, ["model.safetensors", "final_metrics.json"])
    epoch = json.loads((killed / "checkpoints" / "last" / "train_state.json").read_text())["epoch"]
    assert 1 <= epoch < 4

    again = _start(cmd, tmp_path / "again.log")  # the very same command, no --resume
    _finish(again, tmp_path / "again.log")
    _finish(ref, tmp_path / "straight.log")
    assert "resuming from" in (killed / "train.log").read_text()
    _same_tensors(straight / "model.safetensors", killed / "model.safetensors")
    assert json.loads((straight / "final_metrics.json").read_text()) == json.loads((killed / "final_metrics.json").read_text())
    assert read_manifest(killed)["status"] == "complete"


# ------------------------------------------------------------------------------------ T5 stage 1
def _t5_assets(root: Path) -> Path:
    """160 train / 5 val / 5 test images, 2 captions each, unique random codes; prepare_dataset; a tiny T5."""
    from avg.stages import prepare_retriever_dataset as prepare_dataset

    make_demo_t5 = load_tool("make_demo_t5")
    rng = np.random.default_rng(0)
    colors = ("red", "blue", "green", "white", "black", "pink", "grey", "brown", "gold", "teal")
    shapes = ("cube", "ball", "cone", "ring", "star", "disk", "tube", "bowl", "cup", "box", "leaf", "key", "hat",
              "car", "bus", "cat", "dog")
    pairs = [(c, s) for c in colors for s in shapes]
    flat = rng.permutation(16 * 16)
    images, codes = [], {}
    for i in range(170):
        split = "train" if i < 160 else ("val" if i < 165 else "test")
        c, s = pairs[i]
        name = f"img{i}.jpg"
        images.append({"filename": name, "split": split,
                       "sentences": [{"raw": f"a {c} {s} on a table"}, {"raw": f"the {s} is {c}"}]})
        codes[name] = {"code": [int(flat[i]) // 16, int(flat[i]) % 16], "split": split}
    (root / "dataset.json").write_text(json.dumps({"images": images}))
    cdir = root / "codes"
    cdir.mkdir()
    (cdir / "codes.json").write_text(json.dumps({
        "num_levels": 2, "codebook_size": 16, "shared_codebook": False, "code_len": 2, "disambiguation": False,
        "disambiguation_size": 0, "tie_rule": "none", "encoder": {}, "images": codes}))
    np.save(cdir / "codebook.npy", rng.normal(size=(2, 16, 16)).astype(np.float32))
    prepare_dataset.main(["--annotations", str(root / "dataset.json"), "--codes-dir", str(cdir),
                          "--out-dir", str(root / "data")])
    texts = [s["raw"] for im in images if im["split"] == "train" for s in im["sentences"]]
    make_demo_t5.make_demo_t5(texts, root / "t5", vocab_size=60, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    return root


def test_t5_killed_mid_epoch_resumes_bit_for_bit(tmp_path):
    root = _t5_assets(tmp_path)
    flags = ["--data-dir", root / "data", "--codes-dir", root / "codes", "--model", root / "t5", "--epochs", "1",
             "--batch-size", "8", "--lr", "3e-3", "--num-beams", "5", "--eval-batch-size", "8",
             "--eval-train-queries", "0", "--seed", "0", "--log-every", "10", "--save-every-steps", "4", "--device", "cpu"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ref = _start(_cmd("avg.stages.train_retriever_t5", *flags, "--out-dir", straight), tmp_path / "straight.log")
    cmd = _cmd("avg.stages.train_retriever_t5", *flags, "--out-dir", killed)
    # 320 queries / batch 8 = 40 steps in the one epoch; the first checkpoint comes after step 4
    _kill_after(cmd, tmp_path / "killed.log", killed / "checkpoints" / "last" / "train_state.json")
    _no_final_outputs(killed, ["best", "eval/metrics_test.json", "eval/run_test.jsonl"])
    step = json.loads((killed / "checkpoints" / "last" / "train_state.json").read_text())["global_step"]
    assert 4 <= step < 40

    again = _start(cmd, tmp_path / "again.log")
    _finish(again, tmp_path / "again.log")
    _finish(ref, tmp_path / "straight.log")
    assert "resuming from" in (killed / "train.log").read_text()
    for rel in ("checkpoints/last/model.safetensors", "best/model.safetensors"):
        _same_tensors(straight / rel, killed / rel)
    metrics = [_drop_timing(json.loads((d / "eval" / "metrics_test.json").read_text())) for d in (straight, killed)]
    assert metrics[0] == metrics[1]
    runs = [[r.to_json() for r in read_run(d / "eval" / "run_test.jsonl")] for d in (straight, killed)]
    assert runs[0] == runs[1] and len(runs[0]) == 10
    assert read_manifest(killed)["status"] == "complete"
