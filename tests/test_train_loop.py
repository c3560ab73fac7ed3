"""The shared training loop (avg.train.loop.train_epochs) on a tiny linear model: batches from a
DataLoader (``fetch``) are drawn once per epoch, the per-step hook runs once per optimizer step,
--stop-after-epochs stops and the same call continues, --keep-every-epochs keeps copies, and
--log-every 0 logs nothing per step."""
from __future__ import annotations

import json
from argparse import Namespace

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from avg.train.batches import EpochBatchSampler
from avg.train.loop import STATE_FILE, resume_from, train_epochs


class Logs:
    def __init__(self):
        self.lines = []

    def log(self, metrics, step):
        self.lines.append((step, dict(metrics)))


def _run(tmp_path, state=None, **flags):
    torch.manual_seed(0)
    x = torch.randn(24, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    args = Namespace(epochs=3, max_grad_norm=1.0, log_every=0, eval_every=1, save_every_steps=0, stop_after_steps=0,
                     stop_after_epochs=0, keep_every_epochs=0)
    vars(args).update(flags)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    ckpt_dir = tmp_path / "checkpoints" / "last"
    fresh = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    state = dict(fresh if state is None else state)
    if state != fresh:
        resume_from(accelerator, ckpt_dir, scheduler, state, models=[model])
    sampler = EpochBatchSampler(24, 8, seed=1)
    iters, steps, ends, logs = [], [], [], Logs()

    class Counted(DataLoader):
        def __iter__(self):
            iters.append(len(self))
            return super().__iter__()

    def fetch(index_batches):
        return Counted(list(range(24)), batch_sampler=index_batches, collate_fn=torch.tensor)

    def micro_step(idx, epoch, micro):
        loss = ((model(x[idx]).squeeze(-1) - y[idx]) ** 2).mean()
        return loss, {"mse": float(loss.detach())}

    result = train_epochs(accelerator, args, state, sampler=sampler, micro_per_epoch=sampler.batches_per_epoch(),
                          model=model, params=list(model.parameters()), optimizer=optimizer, scheduler=scheduler,
                          ckpt_dir=ckpt_dir, logger=logs, micro_step=micro_step, fetch=fetch,
                          after_step=lambda: steps.append(state["global_step"]), on_epoch_end=ends.append)
    return result, state, iters, steps, ends, logs, accelerator.unwrap_model(model)


def test_fetch_is_iterated_once_per_epoch_and_hooks_run_in_order(tmp_path):
    result, state, iters, steps, ends, logs, _ = _run(tmp_path)
    assert iters == [3, 3, 3]  # a DataLoader's iter() draws from torch's RNG: exactly once an epoch
    assert steps == list(range(1, 10)) and ends == [1, 2, 3]
    assert result["stopped"] is None and result["global_step"] == 9 and state["epoch"] == 3
    assert logs.lines == []  # --log-every 0: the trainer logs per epoch itself
    _, _, _, _, _, logs, _ = _run(tmp_path / "logged", log_every=2)
    assert [s for s, _ in logs.lines] == [2, 4, 6, 8] and "train/mse" in logs.lines[0][1]


def test_stop_after_epochs_resumes_to_the_same_weights_and_keeps_epochs(tmp_path):
    *_, straight = _run(tmp_path / "straight")
    result, state, _, _, ends, _, _ = _run(tmp_path / "cut", stop_after_epochs=2, keep_every_epochs=1)
    assert result["stopped"] == "--stop-after-epochs" and state["epoch"] == 2 and ends == [1, 2]
    saved = json.loads((tmp_path / "cut" / "checkpoints" / "last" / STATE_FILE).read_text())
    assert saved["epoch"] == 2 and saved["global_step"] == 6
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002", "last"]
    result, state, iters, _, ends, _, resumed = _run(tmp_path / "cut", state=saved, stop_after_epochs=2)
    assert result["stopped"] is None and ends == [3] and iters == [3] and state["global_step"] == 9
    assert torch.equal(straight.weight, resumed.weight) and torch.equal(straight.bias, resumed.bias)


def test_a_mid_epoch_checkpoint_resumes_only_on_as_many_processes(tmp_path):
    """Each process's share of an epoch depends on the number of processes: a mid-epoch checkpoint
    continued on another number would skip the wrong batches, so it is refused, naming the file."""
    import pytest

    from avg.core.io import InputError

    result, state, *_ = _run(tmp_path, stop_after_steps=1)
    path = tmp_path / "checkpoints" / "last" / STATE_FILE
    saved = json.loads(path.read_text())
    assert result["stopped"] == "--stop-after-steps" and saved["step_in_epoch"] == 1 and saved["num_processes"] == 1
    path.write_text(json.dumps({**saved, "num_processes": 2}))
    with pytest.raises(InputError, match=r"train_state\.json: a mid-epoch checkpoint of 2 process\(es\)"):
        _run(tmp_path, state=saved)
    path.write_text(json.dumps(saved))
    result, state, *_ = _run(tmp_path, state=saved)
    assert result["stopped"] is None and state["global_step"] == 9


def test_linear_warmup_schedule_is_transformers_step_for_step():
    from transformers import get_linear_schedule_with_warmup

    from avg.train.loop import linear_warmup_schedule

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = make(opt, 7, 40)
        out = []
        for _ in range(45):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out, sched

    ours, sched = lrs(linear_warmup_schedule)
    theirs, _ = lrs(get_linear_schedule_with_warmup)
    assert ours == theirs and ours[0] == 0.0 and max(ours) == 0.5 and ours[-1] == 0.0
    json.dumps(sched.state_dict())  # checkpointed as JSON (avg.train.loop.save_checkpoint)


def test_a_launched_world_the_accelerator_does_not_see_is_refused(monkeypatch):
    """torchrun/accelerate started 2 processes, but this process's Accelerator sees a world of one (as accelerate
    gives without CUDA unless told to use the CPU): both would train on everything and write the same files."""
    import pytest

    from avg.core.io import InputError
    from avg.train import loop

    class OneProcess:
        num_processes = 1
        distributed_type = "NO"
        state = None  # no DeepSpeed plugin

        def __init__(self, cpu=False, **kwargs):
            OneProcess.cpu = cpu

    monkeypatch.setattr(loop, "Accelerator", OneProcess)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="started 2 processes .* sees a world of 1"):
        loop.make_accelerator("auto")
    assert OneProcess.cpu  # without CUDA a launched run is put on the CPU (gloo), where accelerate sees the world
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert loop.make_accelerator("auto").num_processes == 1 and not OneProcess.cpu


def test_accelerates_single_process_fallback_is_refused(monkeypatch):
    """`accelerate launch --num_processes 2` where it sees fewer than two GPUs starts ONE process (its simple
    launcher: MASTER_PORT set, no WORLD_SIZE): refused, naming the flag that launches two."""
    import pytest

    from avg.core.io import InputError
    from avg.train import loop

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(InputError, match="--multi_gpu"):
        loop.make_accelerator("auto")
