"""Shared test fixtures: offline settings and a tiny generated demo dataset."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

# Tests never reach the network or prompt for a wandb login.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402


class DemoData(NamedTuple):
    json_path: Path     # Karpathy json (dataset_demo.json)
    image_root: Path    # folder the json's filepath/filename are relative to
    out_dir: Path       # the folder holding both


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> DemoData:
    """40 rendered 64x64 scenes (24 train / 8 val / 8 test, seed 0), shared by the whole session.

    Treat it as read-only: other tests use the same files."""
    from avg.data.demo import generate_demo_dataset

    out_dir = tmp_path_factory.mktemp("tiny_demo")
    json_path = generate_demo_dataset(out_dir, n_train=24, n_val=8, n_test=8, image_size=64, seed=0,
                                      num_workers=1, progress=False)
    return DemoData(json_path=json_path, image_root=out_dir / "images", out_dir=out_dir)


#: the files whose tests take the longest (minutes, on 2 cores): collected first, so that with several workers
#: (scripts/test.sh, pytest-xdist) they start at once instead of ending the run alone. Order only; nothing is skipped.
LONG_FIRST = ("test_rehearsal.py", "test_deepspeed.py", "test_e2e_scripts.py", "test_grid.py", "test_custom_dataset.py",
              "test_llama_retriever.py", "test_distributed.py", "test_kill_resume.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: n for n, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: the rest keep their order


TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    """Import ``tools/<name>.py`` (tools/ is scripts, not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"avg_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_T5_FLAGS = ["--vocab-size", "300", "--d-model", "32", "--num-layers", "1", "--num-heads", "2", "--d-ff", "64"]


def run_checked(cmd, env, timeout: int = 300):
    """Run a command from the repo root; fail the test with the tail of its output if it fails."""
    import subprocess

    res = subprocess.run([str(c) for c in cmd], cwd=TOOLS.parent, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def stage_script_env(tiny_demo, work: Path, **overrides) -> dict:
    """Environment for the bash stage scripts on the tiny dataset: DATASET=demo with its paths
    pointed at ``tiny_demo``, a random-weight demo CLIP checkpoint, outputs under ``work/out``,
    offline and single-threaded; ``overrides`` set further config variables."""
    import sys

    import open_clip

    from avg.models.clip import register_clip_configs
    from avg.models.demo_clip import save_open_clip_checkpoint

    register_clip_configs()
    model, _, _ = open_clip.create_model_and_transforms("avg-demo-vit", pretrained=None)
    ckpt = save_open_clip_checkpoint(model, work / "clip.pt", extra={"model": "avg-demo-vit"})
    env = dict(os.environ)
    env.update({
        "DATASET": "demo", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "DATA_DIR": str(tiny_demo.out_dir), "IMAGE_ROOT": str(tiny_demo.image_root),
        "ANNOTATIONS": str(tiny_demo.json_path), "OUT_DIR": str(work / "out"),
        "CLIP_PRETRAINED": str(ckpt), "EMB_BATCH_SIZE": "16",
    })
    env.update({k: str(v) for k, v in overrides.items()})
    env.pop("VIRTUAL_ENV", None)
    env.pop("AVG_SKIP_DONE", None)
    return env
