"""Stage manifests wired into the entry points: a finished out dir of another configuration is refused
(naming stage.json and the differing key, exit status 2), --force overwrites, the same configuration
re-runs, AVG_SKIP_DONE=1 skips an up-to-date stage without touching it, and an upstream re-run makes
the downstream stage stale. On the tiny demo fixture, in-process (one CLI subprocess)."""
from __future__ import annotations

import json
import os
from importlib import metadata
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from avg.stages import eval_clip_baseline as clip_baseline
from avg.stages import prepare_retriever_dataset as prepare_dataset
from avg.stages import generate_codes, prepare_emb
from avg.stages import train_rqvae
from avg.artifacts.emb import save_emb
from avg.core.cli import run_main
from avg.core.io import InputError
from avg.core.stages import MANIFEST, SKIP_ENV, read_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chain(tiny_demo, tmp_path_factory):
    """emb -> rqvae -> codes on the tiny demo set; the argv of each cheap stage, keyed by stage."""
    import open_clip

    from avg.models.clip import register_clip_configs
    from avg.models.demo_clip import save_open_clip_checkpoint

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")
    mp.delenv(SKIP_ENV, raising=False)
    root = tmp_path_factory.mktemp("refuse")
    register_clip_configs()
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("avg-demo-vit", pretrained=None)
    ckpt = save_open_clip_checkpoint(model, root / "clip.pt", extra={"model": "avg-demo-vit"})
    argv = {
        "prepare_emb": lambda out: ["--annotations", tiny_demo.json_path, "--image-root", tiny_demo.image_root,
                                    "--out-dir", out, "--clip-model", "avg-demo-vit", "--pretrained", ckpt,
                                    "--batch-size", "16", "--num-workers", "0", "--no-progress"],
        "eval_clip_baseline": lambda out: ["--emb-dir", root / "emb", "--out-dir", out, "--top-k", "8"],
        "generate_codes": lambda out: ["--rqvae-dir", root / "rqvae", "--emb-dir", root / "emb", "--out-dir", out,
                                       "--device", "cpu"],
        "prepare_retriever_dataset": lambda out: ["--annotations", tiny_demo.json_path, "--codes-dir", root / "codes",
                                                  "--out-dir", out],
    }
    prepare_emb.main(_s(argv["prepare_emb"](root / "emb")))
    train_rqvae.main(_s(["--emb-dir", root / "emb", "--out-dir", root / "rqvae", "--epochs", "1", "--batch-size", "8",
                         "--latent-dim", "8", "--hidden-dims", "16", "--num-levels", "2", "--codebook-size", "8",
                         "--kmeans-samples", "24"]))
    generate_codes.main(_s(argv["generate_codes"](root / "codes")))
    yield root, argv
    mp.undo()


def _s(args) -> list[str]:
    return [str(a) for a in args]


MODULES = {"prepare_emb": prepare_emb, "eval_clip_baseline": clip_baseline, "generate_codes": generate_codes,
           "prepare_retriever_dataset": prepare_dataset}
#: a flag that changes each stage's configuration, and the config key it shows up as
CHANGE = {"prepare_emb": (["--seed", "7"], "seed"), "eval_clip_baseline": (["--top-k", "5"], "top_k"),
          "generate_codes": (["--disambiguation", "global"], "disambiguation"),
          "prepare_retriever_dataset": (["--max-train-queries", "10"], "max_train_queries")}


def snapshot(out: Path) -> dict:
    """Name -> (bytes, mtime_ns) of every file under `out`: proves that nothing was rewritten."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", list(MODULES))
def test_stage_refuses_other_config_force_overwrites_and_skip_keeps(stage, chain, tmp_path, monkeypatch, capsys):
    root, argv = chain
    main = MODULES[stage].main
    out = tmp_path / stage
    base = _s(argv[stage](out))
    flag, key = CHANGE[stage]
    main(base)
    first = read_manifest(out)
    assert first["stage"] == stage and first["status"] == "complete"
    before = snapshot(out)

    # another configuration: refused, nothing touched; through the CLI wrapper: exit status 2
    with pytest.raises(InputError) as e:
        main([*base, *flag])
    assert MANIFEST in str(e.value) and key in str(e.value) and "--force" in str(e.value)
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: main([*base, *flag]))
    assert exit_.value.code == 2 and f"{key}:" in capsys.readouterr().err
    assert snapshot(out) == before

    # up to date + AVG_SKIP_DONE=1: returns at once, not a byte or mtime changes
    monkeypatch.setenv(SKIP_ENV, "1")
    main(base)
    assert snapshot(out) == before
    monkeypatch.delenv(SKIP_ENV)

    # the same configuration re-runs (run directly, a stage always runs): a new run id
    main(base)
    again = read_manifest(out)
    assert again["status"] == "complete" and again["run_id"] != first["run_id"]
    assert again["config"] == first["config"]

    # --force overwrites with the other configuration
    main([*base, *flag, "--force"])
    forced = read_manifest(out)
    assert forced["status"] == "complete" and forced["config"][key] != first["config"][key]
    assert forced["environment"]["versions"]["torch"] == metadata.version("torch")


def test_upstream_rerun_makes_downstream_stale(chain, tmp_path, monkeypatch):
    root, argv = chain
    codes, data = tmp_path / "codes", tmp_path / "data"
    generate_codes.main(_s(argv["generate_codes"](codes)))
    data_argv = _s(argv["prepare_retriever_dataset"](data))
    data_argv[data_argv.index("--codes-dir") + 1] = str(codes)
    prepare_dataset.main(data_argv)
    monkeypatch.setenv(SKIP_ENV, "1")
    before = snapshot(data)
    prepare_dataset.main(data_argv)
    assert snapshot(data) == before  # up to date
    monkeypatch.delenv(SKIP_ENV)
    generate_codes.main(_s(argv["generate_codes"](codes)))  # the upstream stage runs again: a new run id
    monkeypatch.setenv(SKIP_ENV, "1")
    prepare_dataset.main(data_argv)
    after = snapshot(data)
    assert after["train.jsonl"][0] == before["train.jsonl"][0]  # same content ...
    assert after["train.jsonl"][1] != before["train.jsonl"][1]  # ... but rebuilt: it was stale
    assert read_manifest(data)["inputs"][str(codes)] == f"run:{read_manifest(codes)['run_id']}"


def test_cli_exit_status_and_message(chain, tmp_path):
    root, argv = chain
    out = tmp_path / "data"
    base = _s(argv["prepare_retriever_dataset"](out))
    prepare_dataset.main(base)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop(SKIP_ENV, None)
    res = subprocess.run([sys.executable, "-m", "avg.stages.prepare_retriever_dataset", *base, "--seed", "5"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and str(out / MANIFEST) in res.stderr and "seed: 0 -> 5" in res.stderr
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------ a trainer
def _emb(out: Path) -> Path:
    rng = np.random.default_rng(0)
    img = rng.normal(size=(80, 16))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    images = [{"image_id": f"im{i}", "file": f"{i}.jpg", "split": "train" if i < 64 else "val"} for i in range(80)]
    captions = [{"text": f"c{i}", "image_row": i, "split": images[i]["split"]} for i in range(80)]
    return save_emb(out, img.astype(np.float16), img.astype(np.float16), images, captions,
                    {"backend": "synthetic", "model": "none", "pretrained": "", "normalized": True})


def test_trainer_refuses_forces_fresh_resumes_interrupted_and_skips(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv(SKIP_ENV, raising=False)
    emb, out = _emb(tmp_path / "emb"), tmp_path / "rqvae"
    base = _s(["--emb-dir", emb, "--out-dir", out, "--epochs", "3", "--batch-size", "16", "--latent-dim", "8",
               "--hidden-dims", "16", "--num-levels", "2", "--codebook-size", "8", "--kmeans-samples", "32"])
    log = lambda: (out / "train.log").read_text()  # noqa: E731
    weights = lambda: (out / "model.safetensors").read_bytes()  # noqa: E731

    # interrupted (a time-limited job): the same command without --resume continues from the checkpoint
    train_rqvae.main([*base, "--stop-after-epochs", "1"])
    assert read_manifest(out)["status"] == "running" and not (out / "model.safetensors").exists()
    final = train_rqvae.main(base)
    assert "resuming from" in log() and ", epoch 2)" in log()
    assert read_manifest(out)["status"] == "complete"
    w_resumed = weights()

    # another configuration is refused; --force starts fresh (no stale checkpoint is picked up)
    with pytest.raises(InputError, match=r"stage\.json.*lr: 0\.0001 -> 0\.002"):
        train_rqvae.main([*base, "--lr", "2e-3"])
    train_rqvae.main([*base, "--lr", "2e-3", "--force"])
    assert "resuming" not in log() and weights() != w_resumed
    assert read_manifest(out)["config"]["lr"] == 2e-3

    # a finished run of the same configuration re-runs from scratch, seeded: the same weights again
    train_rqvae.main([*base, "--lr", "2e-3"])
    w_lr = weights()
    train_rqvae.main([*base, "--lr", "2e-3"])
    assert "resuming" not in log() and weights() == w_lr

    # AVG_SKIP_DONE=1: the previous summary back, nothing rewritten
    before = snapshot(out)
    monkeypatch.setenv(SKIP_ENV, "1")
    skipped = train_rqvae.main([*base, "--lr", "2e-3"])
    assert snapshot(out) == before
    assert skipped == json.loads((out / "final_metrics.json").read_text())
    assert final["step"] == skipped["step"]
