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


TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    """Import ``tools/<name>.py`` (tools/ is scripts, not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"avg_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
