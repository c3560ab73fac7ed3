"""Same seed, same inputs -> identical features, RQ-VAE weights, codes, retriever data, CLIP-baseline and
T5 metrics and run files (CPU); a different seed changes the tokenizer. Every stage leaves its seed,
full configuration and library versions next to its outputs. On the tiny demo fixture."""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch

from avg.stages import eval_clip_baseline as clip_baseline
from avg.stages import prepare_retriever_dataset as prepare_dataset, train_retriever_t5 as train_t5
from avg.stages import generate_codes, prepare_emb
from avg.stages import train_rqvae
from avg.core.stages import SKIP_ENV, read_manifest
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("per_s", "seconds", "time")


def _s(args) -> list[str]:
    return [str(a) for a in args]


def _files(d: Path, pattern: str) -> dict:
    """Name -> bytes; stage.json is left out (its run id and times differ by design)."""
    return {p.name: p.read_bytes() for p in sorted(d.glob(pattern)) if p.name != "stage.json"}


def _drop_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


@pytest.fixture(scope="module")
def twice(tiny_demo, tmp_path_factory):
    """Every stage run twice, into a/ and b/, from the same inputs and seeds (+ an RQ-VAE with another seed)."""
    import open_clip

    from avg.models.clip import register_clip_configs
    from avg.models.demo_clip import save_open_clip_checkpoint

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")
    mp.delenv(SKIP_ENV, raising=False)
    root = tmp_path_factory.mktemp("repeat")
    register_clip_configs()
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("avg-demo-vit", pretrained=None)
    ckpt = save_open_clip_checkpoint(model, root / "clip.pt", extra={"model": "avg-demo-vit"})
    make_demo_t5 = load_tool("make_demo_t5")
    texts = [s["raw"] for im in json.loads(tiny_demo.json_path.read_text())["images"] for s in im["sentences"]]
    make_demo_t5.make_demo_t5(texts, root / "t5", vocab_size=200, d_model=16, num_layers=1, num_heads=2, d_ff=32)

    rq = ["--epochs", "2", "--batch-size", "8", "--latent-dim", "8", "--hidden-dims", "16", "--num-levels", "2",
          "--codebook-size", "8", "--kmeans-samples", "24", "--dead-code-threshold", "3"]
    for run in ("a", "b"):
        d = root / run
        prepare_emb.main(_s(["--annotations", tiny_demo.json_path, "--image-root", tiny_demo.image_root,
                             "--out-dir", d / "emb", "--clip-model", "avg-demo-vit", "--pretrained", ckpt,
                             "--batch-size", "16", "--num-workers", "0", "--no-progress", "--seed", "1"]))
        # downstream stages read run a's upstream outputs, so each comparison isolates one stage
        clip_baseline.main(_s(["--emb-dir", root / "a" / "emb", "--out-dir", d / "clip", "--top-k", "8"]))
        train_rqvae.main(_s(["--emb-dir", root / "a" / "emb", "--out-dir", d / "rqvae", *rq, "--seed", "5"]))
        generate_codes.main(_s(["--rqvae-dir", root / "a" / "rqvae", "--emb-dir", root / "a" / "emb",
                                "--out-dir", d / "codes", "--device", "cpu"]))
        prepare_dataset.main(_s(["--annotations", tiny_demo.json_path, "--codes-dir", root / "a" / "codes",
                                 "--out-dir", d / "data", "--max-train-queries", "80", "--seed", "3"]))
        train_t5.main(_s(["--data-dir", root / "a" / "data", "--codes-dir", root / "a" / "codes", "--model", root / "t5",
                          "--out-dir", d / "t5", "--epochs", "1", "--batch-size", "16", "--lr", "3e-3",
                          "--num-beams", "5", "--eval-batch-size", "8", "--eval-train-queries", "8", "--seed", "0",
                          "--device", "cpu"]))
    train_rqvae.main(_s(["--emb-dir", root / "a" / "emb", "--out-dir", root / "rqvae_seed6", *rq, "--seed", "6"]))
    yield root
    mp.undo()


def test_features_are_identical(twice):
    a, b = twice / "a" / "emb", twice / "b" / "emb"
    assert _files(a, "*.npy") == _files(b, "*.npy") and len(_files(a, "*.npy")) == 2
    assert (a / "index.json").read_bytes() == (b / "index.json").read_bytes()


def test_rqvae_weights_identical_and_seed_matters(twice):
    a, b = twice / "a" / "rqvae", twice / "b" / "rqvae"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "final_metrics.json").read_bytes() == (b / "final_metrics.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (twice / "rqvae_seed6" / "model.safetensors").read_bytes()


def test_codes_identical(twice):
    a, b = twice / "a" / "codes", twice / "b" / "codes"
    for name in ("codes.json", "codebook.npy", "stats.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_retriever_data_identical(twice):
    a, b = twice / "a" / "data", twice / "b" / "data"
    files = _files(a, "*.json*")
    assert {"train.jsonl", "val.jsonl", "test.jsonl", "gallery_test.json", "meta.json"} <= set(files)
    assert files == _files(b, "*.json*")
    assert len((a / "train.jsonl").read_text().splitlines()) == 80  # the seeded subset


def test_clip_baseline_metrics_and_run_identical(twice):
    a, b = twice / "a" / "clip", twice / "b" / "clip"
    assert (a / "run_clip_test.jsonl").read_bytes() == (b / "run_clip_test.jsonl").read_bytes()
    ma, mb = (_drop_timing(json.loads((d / "metrics_clip_test.json").read_text())) for d in (a, b))
    assert ma == mb and ma["num_queries"] == 40


def test_t5_metrics_and_runs_identical(twice):
    a, b = twice / "a" / "t5", twice / "b" / "t5"
    runs = _files(a / "eval", "run_*.jsonl")
    assert {"run_test.jsonl", "run_val_epoch1.jsonl", "run_train_epoch1.jsonl"} <= set(runs)
    assert runs == _files(b / "eval", "run_*.jsonl")
    ma, mb = (_drop_timing(json.loads((d / "eval" / "metrics_test.json").read_text())) for d in (a, b))
    assert ma == mb and ma["num_queries"] == 40
    assert (a / "best" / "model.safetensors").read_bytes() == (b / "best" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("stage,seed", [("emb", 1), ("clip", None), ("rqvae", 5), ("codes", None), ("data", 3),
                                        ("t5", 0)])
def test_configuration_seed_and_versions_saved_with_outputs(twice, stage, seed):
    d = twice / "a" / stage
    m = read_manifest(d)
    assert m["status"] == "complete" and m["inputs"]  # what it was made from, fingerprinted
    if seed is not None:
        assert m["config"]["seed"] == seed
    env = m["environment"]
    assert env["versions"]["torch"] == metadata.version("torch") and env["versions"]["numpy"]
    assert env["python"] and isinstance(env["argv"], list)
    if stage in ("rqvae", "t5"):  # the trainers also keep the full argv config and environment.json
        full = json.loads((d / ("train_args.json" if stage == "rqvae" else "config.json")).read_text())
        assert full["seed"] == seed and full["out_dir"] == str(d)
        assert json.loads((d / "environment.json").read_text())["versions"]["torch"] == metadata.version("torch")
