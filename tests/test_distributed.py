"""Two processes (torchrun, gloo on the CPU): the reranker trains under DDP with a tied and an
untied LM, by LoRA and by full fine-tuning, and --batch-size is the global batch. An untied LM used to stop at the second step ("Expected
to have finished reduction"): its output head held trainable image-token rows the reranker never
runs, so they never got a gradient.

The T5 retriever's two-process training and sharded evaluation, and LoRA on an untied LM over two processes, run in
the rehearsal (tests/test_rehearsal.py: COCO with the best recipe on two processes; Flickr30K's models evaluated by
two processes, rankings and scores compared with one)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_reranker import make_llama, make_tokenizer, prepared, stage_inputs, train_args  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(module: str, args, port: int, timeout: int = 600) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", module, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def untied_llama(stage_inputs):  # noqa: F811
    path = stage_inputs / "llama_untied"
    if not path.is_dir():
        tok = make_tokenizer()
        lm = make_llama(len(tok), tied=False)
        assert lm.get_output_embeddings().weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr()
        lm.save_pretrained(path)
        tok.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("tied,lora", [(False, False), (True, True)], ids=["untied-full", "tied-lora"])
def test_reranker_trains_on_two_processes(stage_inputs, prepared, untied_llama, tmp_path, tied, lora):  # noqa: F811
    data, _ = prepared
    out = tmp_path / "rr"
    args = train_args(stage_inputs, data, out, "--device", "cpu", "--epochs", "1")
    if not tied:
        args[args.index("--model") + 1] = str(untied_llama)
    if lora:
        args.remove("--full-finetune")
    port = 29500 + (hash((tied, lora, os.getpid())) % 2000)
    res = _torchrun("avg.stages.finetune_reranker_llama", args, port)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Expected to have finished reduction" not in res.stderr
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    steps = [x for x in lines if "train/loss" in x or "train/listwise" in x]
    assert steps and any("eval/val/R@1" in x for x in lines)
    assert (out / "best").is_dir()
    # --batch-size is the global batch: 4 lists per step, 2 on each process
    assert "global batch 4 per optimizer step = 2 per process x 2 process(es)" in (out / "train.log").read_text()


def test_batch_size_is_global_and_must_divide_among_processes():
    from avg.train.loop import describe_batch, per_process_batch
    from avg.core.io import InputError

    assert per_process_batch(128, 4) == 32 and per_process_batch(8, 1) == 8
    assert describe_batch(128, 4, 2) == "global batch 256 per optimizer step = 32 per process x 4 process(es) x 2 accumulation step(s)"
    with pytest.raises(InputError, match="--batch-size 10 is the global batch: it must be a multiple of the 4 processes"):
        per_process_batch(10, 4)


@pytest.mark.slow
def test_rqvae_trains_on_two_processes(tmp_path):
    """The RQ-VAE on the shared loop under DDP: each process takes every other batch (all full, so the
    dead-code resets gather codes of one shape from both), and a kill-free --stop-after-epochs then
    the same command continues from the checkpoint both processes wrote."""
    from test_rqvae_train import make_emb

    emb = make_emb(tmp_path / "emb", n=200)
    args = ["--emb-dir", emb, "--out-dir", tmp_path / "rq", "--epochs", "2", "--batch-size", "16", "--num-levels", "2",
            "--codebook-size", "16", "--latent-dim", "4", "--hidden-dims", "16", "--kmeans-samples", "64",
            "--dead-code-threshold", "1", "--seed", "3", "--device", "cpu"]
    res = _torchrun("avg.stages.train_rqvae", [*args, "--stop-after-epochs", "1"], 29200 + os.getpid() % 90)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = (tmp_path / "rq" / "train.log").read_text()
    assert "5 steps/epoch, 2 processes" in log  # 160 train images, 16 a process: 10 batches, 5 each
    res = _torchrun("avg.stages.train_rqvae", args, 29100 + os.getpid() % 90)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    final = json.loads((tmp_path / "rq" / "final_metrics.json").read_text())
    assert final["step"] == 10 and final["epoch"] == 2 and "resuming from" in (tmp_path / "rq" / "train.log").read_text()
    epochs = [json.loads(x) for x in open(tmp_path / "rq" / "metrics.jsonl") if '"epoch"' in x]
    assert sum(e["train/dead_codes_reset"] for e in epochs) > 0
