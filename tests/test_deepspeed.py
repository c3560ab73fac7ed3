"""DeepSpeed ZeRO-2 through accelerate: the config users launch with (configs/accelerate/deepspeed_zero2.yaml +
configs/deepspeed/zero2.json) is accepted by every trainer, which fills its "auto" entries from its own flags,
and a real ZeRO-2 step runs on the CPU -- one process: accelerate's state sees a world of one under DeepSpeed
without a GPU (it starts the process group for GPU backends only), so a two-process ZeRO-2 run on CPUs is refused
by the trainers (avg.train.loop.make_accelerator) rather than run as two separate trainings."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_configs_are_zero2_with_every_batch_entry_left_to_the_trainers():
    import yaml

    acc = yaml.safe_load((ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml").read_text())
    assert acc["distributed_type"] == "DEEPSPEED"
    ds = json.loads((ROOT / acc["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert ds["zero_optimization"]["stage"] == 2
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size"):
        assert ds[key] == "auto", key


def test_zero3_is_refused_before_anything_trains(monkeypatch):
    from types import SimpleNamespace

    from avg.core.io import InputError
    from avg.train import loop

    class ZeRO3:
        num_processes = 1
        distributed_type = "DEEPSPEED"
        state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3))

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(loop, "Accelerator", ZeRO3)
    with pytest.raises(InputError, match="ZeRO stage 3 partitions the weights"):
        loop.make_accelerator("auto")


@pytest.mark.slow
def test_every_trainer_takes_a_real_zero2_step_on_the_cpu(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install -e .[deepspeed])")
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("DeepSpeed builds its CPU communication op on first use: needs a C++ compiler")
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([str(accelerate), "launch", "--config_file", "configs/accelerate/deepspeed_zero2.yaml",
                          "--num_processes", "1", "tools/gpu_check.py", "--dry-run", "--only", "stages_tiny",
                          "--out", str(tmp_path / "summary.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    check = json.loads((tmp_path / "summary.json").read_text())["checks"]["stages_tiny"]
    assert check["pass"] and check["distributed_types"] == ["DEEPSPEED"]
    # the RQ-VAE, both T5 stages, the LLaMA retriever and the reranker trained (and saved best/) under ZeRO-2
    for trainer in ("train_rqvae", "train_retriever_t5", "train_retriever_t5_stage2", "finetune_retriever_llama",
                    "finetune_reranker_llama", "test_reranker_llama"):
        assert trainer in check["stage_seconds"]
