"""The training loop shared by every trainer: the RQ-VAE, the T5 and LLaMA retrievers and the reranker.

Checkpoints (accelerate state + our counters, swapped in atomically), the run prelude (claim the
output folder, skip, resume or start fresh), gradient accumulation bookkeeping, the optimizer step,
best-checkpoint selection, the mid-epoch checkpoint / stop rules and the epoch loop itself
(:func:`train_epochs`) live here once, so every trainer resumes, logs and selects models the same
way; a trainer supplies only its micro-step.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from accelerate import Accelerator
from safetensors import safe_open

from avg.core.io import InputError, read_json, replace_dir, write_json
from avg.core.progress import tqdm
from avg.core.stages import StageRun, begin_stage, skip_if_done
from avg.core.tracking import RunLogger, get_logger

STATE_FILE = "train_state.json"


def resolve_mixed_precision(choice: str, *, cpu: bool = False, t5: bool = False, allow_fp16: bool = False) -> str:
    """accelerate's mixed-precision mode for ``--mixed-precision``: 'auto' is bf16 where the GPU
    supports it, else 'no' (fp32; the CPU always). fp16 is refused for T5, whose activations overflow
    fp16's range, unless ``allow_fp16``. On a GPU, float32 matrix multiplies use TF32 tensor cores."""
    import torch

    cuda = torch.cuda.is_available() and not cpu
    choice = choose_precision(choice, cuda=cuda, bf16_ok=cuda and torch.cuda.is_bf16_supported(), t5=t5,
                              allow_fp16=allow_fp16)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return choice


def make_accelerator(device: str = "auto", *, grad_accum: int = 1, **kwargs) -> Accelerator:
    """The trainers' ``Accelerator`` for ``--device auto|cpu``, accumulating ``grad_accum`` micro-batches per
    optimizer step (``kwargs`` go to it: mixed precision, ...). Under DeepSpeed (``accelerate launch --config_file
    configs/accelerate/deepspeed_zero2.yaml``) only ZeRO stages 0-2 are accepted: every process keeps the whole
    model, so the first one can save and validate it (ZeRO-3 partitions the weights themselves).

    Under a launcher (torchrun, ``accelerate launch``) on a machine without CUDA, accelerate would give every
    process a world of its own unless told to use the CPU: W processes would each train on all the data and
    write the same outputs at once. There the CPU (gloo) is chosen; and a launcher's world that the
    Accelerator does not see is refused at once, before any output is touched."""
    import os

    import torch

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if "WORLD_SIZE" not in os.environ and "ACCELERATE_USE_CPU" in os.environ and "MASTER_PORT" in os.environ:
        # accelerate's single-process launcher, which `accelerate launch --num_processes N` falls back to where it
        # sees fewer than two GPUs (it sets MASTER_PORT for N > 1, never WORLD_SIZE)
        raise InputError("`accelerate launch` was asked for several processes but started one (its multi-process "
                         "launcher needs --multi_gpu where it sees fewer than two GPUs, also on CPUs): add --multi_gpu")
    cpu = device == "cpu" or (launched > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=grad_accum, **kwargs)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and int(plugin.zero_stage or 0) >= 3:
        raise InputError(f"DeepSpeed ZeRO stage {plugin.zero_stage} partitions the weights; the trainers save and validate "
                         "whole models from the first process: use ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml)")
    if accelerator.num_processes != launched:
        raise InputError(f"the launcher started {launched} processes (WORLD_SIZE={launched}) but this one sees a world of "
                         f"{accelerator.num_processes} ({accelerator.distributed_type}); every process would train on "
                         "everything and write the same outputs. Launch with torchrun or `accelerate launch` (with "
                         "--cpu on a machine without GPUs), or run one process")
    return accelerator


def configure_deepspeed(accelerator, *, micro_batch: int, grad_accum: int = 1, max_grad_norm: float = 0.0) -> None:
    """Fill the "auto" entries of a DeepSpeed config (configs/deepspeed/zero2.json) from the trainer's own flags,
    before ``accelerator.prepare``: the trainers batch with their own samplers, which accelerate cannot read the
    micro-batch from. No-op without DeepSpeed. Gradient clipping moves into the DeepSpeed engine
    (``clip_grad_norm_`` then only reports the norm)."""
    from accelerate import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = int(micro_batch)
    cfg["gradient_accumulation_steps"] = int(grad_accum)
    cfg["train_batch_size"] = int(micro_batch) * int(grad_accum) * accelerator.num_processes
    cfg["gradient_clipping"] = float(max_grad_norm) if max_grad_norm > 0 else 0.0


def choose_precision(choice: str, *, cuda: bool, bf16_ok: bool, t5: bool = False, allow_fp16: bool = False) -> str:
    """The rule of :func:`resolve_mixed_precision`, given what the device supports."""
    if choice == "auto":
        choice = "bf16" if cuda and bf16_ok else "no"
    if choice == "fp16" and t5 and not allow_fp16:
        raise InputError("--mixed-precision fp16: T5 overflows in fp16 (activations beyond 65504 give inf/nan); "
                         "use bf16 (the default where the GPU has it), or pass --allow-fp16 to force it")
    return choice


def per_process_batch(batch_size: int, world_size: int, flag: str = "--batch-size") -> int:
    """``--batch-size`` is the global batch of one micro-step, over all processes: each of
    ``world_size`` processes takes ``batch_size / world_size`` (so the paper's 128 stays 128 on 4
    GPUs, with the same learning rate); a size that does not divide is refused."""
    if batch_size < 1:
        raise InputError(f"{flag} must be >= 1, got {batch_size}")
    if batch_size % world_size:
        raise InputError(f"{flag} {batch_size} is the global batch: it must be a multiple of the {world_size} "
                         f"processes (e.g. {max(world_size, batch_size // world_size * world_size)})")
    return batch_size // world_size


def describe_batch(batch_size: int, world_size: int, grad_accum: int = 1) -> str:
    per = batch_size // world_size
    return (f"global batch {batch_size * grad_accum} per optimizer step = {per} per process x {world_size} "
            f"process(es) x {grad_accum} accumulation step(s)")


def _linear_warmup(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def linear_warmup_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the peak learning rate over ``warmup_steps``, then linear decay to 0 at ``total_steps``:
    transformers' ``get_linear_schedule_with_warmup``, step for step (tested), without its import, which pulls in
    peft and costs every stage process about 4 s."""
    import functools

    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, functools.partial(_linear_warmup, warmup=warmup_steps, total=total_steps))


def checkpoint_dir(out_dir) -> Path:
    """Where every trainer keeps the checkpoint it resumes from: ``<out-dir>/checkpoints/last``."""
    return Path(out_dir) / "checkpoints" / "last"


def log_resumed(logger, ckpt_dir: Path, state: dict, *, explicit: bool) -> None:
    """The one line every trainer logs when it continues from a checkpoint (after :func:`resume_from`)."""
    logger.warning("resuming from %s (step %d, epoch %d)%s", ckpt_dir, state["global_step"], state["epoch"] + 1,
                   "" if explicit else ": this configuration was interrupted here")


def log_stopped(logger, stopped: str, state: dict, epochs: int, steps_this_run: int) -> None:
    """The one line every trainer logs when a stop flag ended the run before ``epochs``."""
    logger.info("stopped by %s at step %d (%d this run), %d of %d epochs done; the same command (or --resume) "
                "continues", stopped, state["global_step"], steps_this_run, state["epoch"], epochs)


@dataclass
class TrainingRun:
    """What :func:`start_training_run` decided: the claimed stage, its logger and whether it resumes;
    ``skipped`` is the previous run's summary when its outputs were complete and up to date."""
    stage: Optional[StageRun]
    logger: Optional[RunLogger]
    resuming: bool
    skipped: Optional[dict] = None


def start_training_run(accelerator, args, out_dir: Path, stage: str, *, inputs, run_name: str,
                       logger_name: str, ignore=(), stale=("best", "checkpoints", "eval")) -> TrainingRun:
    """Every trainer's prelude, on every process: claim ``out_dir`` for ``stage`` with this
    configuration (:func:`~avg.core.stages.begin_stage`; every rank reads the manifest before the
    main process rewrites it, so all take the same decision), return at once when it is up to
    date and skipping is on, resume from ``checkpoints/last`` when asked (``--resume``) or when the
    same configuration was interrupted, open the run logger, and on a fresh start remove an older
    run's ``stale`` outputs (``best/``, ``checkpoints/``, ``eval/`` by default: a fresh run never
    reports an older model). ``ignore``: flags that do not change the result (see begin_stage)."""
    ckpt_dir = checkpoint_dir(out_dir)
    run = begin_stage(out_dir, stage, vars(args), force=args.force, mark_running=False, inputs=inputs,
                      ignore=ignore)
    accelerator.wait_for_everyone()
    if run.up_to_date and skip_if_done():
        get_logger(logger_name).info("%s: outputs in %s are complete and up to date; skipping", stage, out_dir)
        return TrainingRun(run, None, False, dict(run.previous.get("summary") or {}))
    interrupted = not run.fresh and run.previous.get("status") == "running"
    resuming = bool((args.resume or interrupted) and (ckpt_dir / STATE_FILE).is_file())
    run.running()
    logger = RunLogger(out_dir, project=args.wandb_project, run_name=run_name, config=vars(args), resume=resuming,
                       job_type=stage)
    if args.resume and not resuming:
        logger.info("--resume: no checkpoint at %s, starting fresh", ckpt_dir)
    if not resuming and accelerator.is_main_process:
        for old in (out_dir / name for name in stale):
            if old.exists() or old.is_symlink():  # a fresh run must never report an older run's model or metrics
                logger.info("fresh run: removing %s from an earlier run", old)
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    accelerator.wait_for_everyone()
    return TrainingRun(run, logger, resuming)


def add_checkpoint_args(p, *, log_every: int, wandb_project: str = "avg"):
    """The checkpoint and logging flags every trainer takes (one name per concept); returns the group."""
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--resume", action="store_true", help="continue from out-dir/checkpoints/last if present; not needed after a "
                   "kill: re-running the same command resumes an interrupted run of the same configuration automatically")
    g.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N optimizer steps (0: per epoch only)")
    g.add_argument("--stop-after-steps", type=int, default=0, help="checkpoint and exit after N optimizer steps of this "
                   "invocation (preemptible jobs; 0: off)")
    g.add_argument("--stop-after-epochs", type=int, default=0, help="checkpoint and exit after N epochs of this invocation "
                   "(time-limited jobs; 0: run to --epochs)")
    g.add_argument("--keep-every-epochs", type=int, default=0, help="also keep a copy of the checkpoint as "
                   "checkpoints/epoch_XXXX every N epochs (checkpoints/last is rewritten every epoch; 0: only that)")
    g.add_argument("--log-every", type=int, default=log_every, help="log the training loss every N optimizer steps (0: "
                   "per epoch only, where the trainer logs per-epoch means)")
    g.add_argument("--wandb-project", default=wandb_project, help="wandb project (offline unless WANDB_MODE=online)")
    g.add_argument("--run-name", default=None, help="run name for logs and wandb")
    return g


def save_checkpoint(accelerator, ckpt_dir: Path, state: dict) -> None:
    """accelerate save_state (model, optimizer, RNG) + our counters and the LR schedule (``state``,
    kept current by optimizer_step) as JSON, swapped in atomically."""
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(state, tmp / STATE_FILE)
        replace_dir(tmp, ckpt_dir)
    accelerator.wait_for_everyone()


def resume_from(accelerator, ckpt_dir: Path, scheduler, state: dict, models=(), **load_kwargs) -> None:
    """Restore ``save_checkpoint``'s output into the prepared objects, ``scheduler`` and ``state``.

    Loads are safe: weights from safetensors, optimizer/RNG through accelerate's weights_only torch
    loads, the schedule from JSON. (The scheduler is never ``register_for_checkpointing``-ed:
    accelerate unpickles such custom objects with weights_only=False.) Each of ``models`` (the
    prepared modules) is checked against the checkpoint's tensor shapes first, so a checkpoint of
    another model size is a clear error, not a size-mismatch traceback."""
    for i, model in enumerate(models):
        path = ckpt_dir / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not path.is_file():
            continue
        have = {k: tuple(v.shape) for k, v in accelerator.unwrap_model(model).state_dict().items()}
        with safe_open(str(path), framework="pt") as f:
            bad = [f"{k} {tuple(f.get_slice(k).get_shape())} in the checkpoint vs {have[k]} in the model"
                   for k in f.keys() if k in have and tuple(f.get_slice(k).get_shape()) != have[k]]
        if bad:
            raise InputError(f"{path}: checkpoint of another model configuration ({len(bad)} tensor(s) differ, e.g. "
                             f"{'; '.join(bad[:3])}); resume with the settings it was made with, or start a fresh run")
    accelerator.load_state(str(ckpt_dir), **load_kwargs)
    saved = read_json(ckpt_dir / STATE_FILE)
    if "scheduler" in saved:
        scheduler.load_state_dict(saved["scheduler"])
    elif saved.get("global_step", 0):
        raise InputError(f"{ckpt_dir / STATE_FILE}: no learning-rate schedule in this checkpoint (written by an older "
                         "version); start a fresh run (--force) instead of resuming")
    state.update(saved)


def accumulation_group(micro: int, grad_accum: int, micro_per_epoch: int) -> tuple[int, bool]:
    """(size of the accumulation group holding micro-batch `micro`, whether it is the group's last)."""
    start = (micro // grad_accum) * grad_accum
    size = min(grad_accum, micro_per_epoch - start)
    return size, micro == start + size - 1


def optimizer_step(accelerator, params, optimizer, scheduler, max_grad_norm: float, state: dict) -> None:
    """Clip, step, advance the schedule (unless the step was skipped), clear grads, count the step."""
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:
        scheduler.step()
    state["scheduler"] = scheduler.state_dict()  # checkpointed as JSON with the counters
    optimizer.zero_grad(set_to_none=True)
    state["global_step"] += 1
    state["step_in_epoch"] += 1


def select_best(state: dict, metrics: dict, epoch: int) -> tuple[str, float, bool]:
    """Model selection by val R@1 (train R@1 when there is no val split): (key, score, improved)."""
    key = "eval/val/R@1" if "eval/val/R@1" in metrics else "eval/train/R@1"
    score = metrics.get(key, float("-inf"))
    improved = state["best_r1"] is None or score > state["best_r1"]
    if improved:
        state["best_r1"], state["best_epoch"] = score, epoch
    return key, score, improved


def checkpoint_after_step(accelerator, ckpt_dir: Path, state: dict, steps_this_run: int,
                          save_every_steps: int, stop_after_steps: int) -> bool:
    """--save-every-steps / --stop-after-steps; True when the run must stop (checkpoint written)."""
    if stop_after_steps and steps_this_run >= stop_after_steps:
        save_checkpoint(accelerator, ckpt_dir, state)
        return True
    if save_every_steps and state["global_step"] % save_every_steps == 0:
        save_checkpoint(accelerator, ckpt_dir, state)
    return False


def train_epochs(accelerator, args, state: dict, *, sampler, micro_per_epoch: int, model, params, optimizer,
                 scheduler, ckpt_dir: Path, logger, micro_step: Callable,
                 run_eval: Optional[Callable[[int], None]] = None,
                 log_extra: Optional[Callable[[], dict]] = None,
                 on_epoch_start: Optional[Callable[[int], None]] = None,
                 on_epoch_end: Optional[Callable[[int], None]] = None,
                 after_step: Optional[Callable[[], None]] = None,
                 fetch: Optional[Callable[[list], Iterable]] = None) -> dict:
    """Run epochs ``state["epoch"] .. args.epochs - 1`` (at most ``args.stop_after_epochs`` of them when
    set), resuming mid-epoch from ``state`` (refused when the number of processes changed since).

    ``micro_step(batch, epoch, micro) -> (loss, parts)`` does one micro-batch's forward pass (the
    backward pass, gradient accumulation without DDP sync, the optimizer step, logging, mid-epoch
    checkpoints and the stop rules happen here); ``parts`` are floats averaged into
    ``train/<name>`` next to ``train/loss`` every ``args.log_every`` steps (0: no step logs).
    ``batch`` is the sampler's index batch, or what ``fetch`` (the epoch's list of index batches ->
    an iterable of batches, e.g. a DataLoader with workers) makes of it. ``after_step()`` runs after
    each optimizer step, before logging and checkpointing (state it keeps in ``state`` is
    checkpointed). After each epoch: ``on_epoch_end(epoch)``, ``run_eval(epoch)`` every
    ``args.eval_every`` epochs and after the last, then a checkpoint (kept as
    ``checkpoints/epoch_XXXX`` too every ``args.keep_every_epochs``). ``model`` is the prepared
    (possibly DDP-wrapped) module, ``params`` what is clipped and stepped; ``args.grad_accum`` is 1
    for a trainer without that flag. Returns the step counts and timings (``train_seconds`` never
    counts evaluation) and ``stopped``: the flag that stopped the run early
    (``--stop-after-steps`` / ``--stop-after-epochs``), else None.
    """
    t_start, steps_this_run, train_seconds, stopped = time.time(), 0, 0.0, None
    grad_accum = getattr(args, "grad_accum", 1)
    saved_procs = state.get("num_processes")
    if state["step_in_epoch"] and saved_procs not in (None, accelerator.num_processes):
        raise InputError(f"{ckpt_dir / STATE_FILE}: a mid-epoch checkpoint of {saved_procs} process(es); each process's "
                         f"share of the epoch differs on {accelerator.num_processes}: resume with {saved_procs}, or "
                         "from an epoch's end (--save-every-steps 0)")
    state["num_processes"] = accelerator.num_processes
    stop_epochs, keep_every = args.stop_after_epochs, args.keep_every_epochs  # add_checkpoint_args' flags
    last_epoch = min(args.epochs, state["epoch"] + stop_epochs) if stop_epochs > 0 else args.epochs
    running: dict = {}
    for epoch in range(state["epoch"], last_epoch):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        skip = state["step_in_epoch"] * grad_accum
        sampler.set_epoch(epoch, skip_batches=skip)
        t_epoch = t_log = time.time()
        steps_at_log = steps_this_run
        batches = list(sampler) if fetch is None else fetch(list(sampler))
        batches = tqdm(_lazy(batches), total=len(batches), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                       disable=not accelerator.is_local_main_process)
        for j, batch in enumerate(batches):
            micro = skip + j
            group_size, last_in_group = accumulation_group(micro, grad_accum, micro_per_epoch)
            # accumulation through accelerate: it syncs (DDP) or steps (the DeepSpeed engine) on the group's last
            # micro-batch, and divides the loss by grad_accum -- here by the group's size (an epoch's last group
            # can be shorter), so that every optimizer step averages its micro-batches
            accelerator.sync_gradients = last_in_group
            with accelerator.no_sync(model) if not last_in_group else contextlib.nullcontext():
                loss, parts = micro_step(batch, epoch, micro)
                accelerator.backward(loss * (accelerator.gradient_accumulation_steps / group_size))
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                running[k] = running.get(k, 0.0) + float(v)
            running["n"] = running.get("n", 0) + 1
            if not last_in_group:
                continue
            optimizer_step(accelerator, params, optimizer, scheduler, args.max_grad_norm, state)
            steps_this_run += 1
            if after_step is not None:
                after_step()
            if args.log_every and state["global_step"] % args.log_every == 0:
                n = max(running.pop("n"), 1)
                logs = {f"train/{k}": v / n for k, v in running.items()}
                logs.update({"train/lr": scheduler.get_last_lr()[0], "epoch": epoch + 1,
                             "train/s_per_step": (time.time() - t_log) / max(steps_this_run - steps_at_log, 1)})
                if log_extra is not None:
                    logs.update(log_extra())
                logger.log(logs, step=state["global_step"])
                running = {}
                t_log, steps_at_log = time.time(), steps_this_run
            if checkpoint_after_step(accelerator, ckpt_dir, state, steps_this_run, args.save_every_steps,
                                     args.stop_after_steps):
                stopped = "--stop-after-steps"
                break
        train_seconds += time.time() - t_epoch
        if stopped:
            break
        done = epoch + 1
        state["epoch"], state["step_in_epoch"] = done, 0
        if on_epoch_end is not None:
            on_epoch_end(done)
        if run_eval is not None and ((args.eval_every and done % args.eval_every == 0) or done == args.epochs):
            run_eval(done)
        save_checkpoint(accelerator, ckpt_dir, state)
        if keep_every and done % keep_every == 0:
            keep_checkpoint(accelerator, ckpt_dir, ckpt_dir.with_name(f"epoch_{done:04d}"))
    if not stopped and state["epoch"] < args.epochs:
        stopped = "--stop-after-epochs"
    return {"global_step": state["global_step"], "steps_this_run": steps_this_run, "train_seconds": train_seconds,
            "wall_seconds": time.time() - t_start,
            "s_per_step": train_seconds / steps_this_run if steps_this_run else None, "stopped": stopped}


def _lazy(batches: Iterable):
    """``batches`` iterated only when the loop starts: tqdm calls iter() once when built and again
    in its loop, and every iter() of a DataLoader draws its base seed from torch's global RNG (and
    starts its workers)."""
    yield from batches


def keep_checkpoint(accelerator, ckpt_dir: Path, dest: Path) -> None:
    """A copy of the checkpoint ``ckpt_dir`` at ``dest`` (written beside it, then swapped in)."""
    if accelerator.is_main_process:
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ckpt_dir, tmp)
        replace_dir(tmp, dest)
    accelerator.wait_for_everyone()


def _plain_name(name: str) -> str:
    """Parameter name without DDP's ``module.`` prefix (accelerate saves DDP models unwrapped)."""
    return name[len("module."):] if name.startswith("module.") else name


def trainable_names(model) -> set[str]:
    return {_plain_name(n) for n, p in model.named_parameters() if p.requires_grad}


def trainable_only_hooks(accelerator: Accelerator) -> None:
    """Checkpoint only what trains (LoRA + voken rows): a 7B base model is not rewritten every epoch."""

    def on_save(models, weights, output_dir):
        for i, (model, state) in enumerate(zip(models, weights)):
            keep = trainable_names(model)
            weights[i] = {k: v for k, v in state.items() if _plain_name(k) in keep}

    accelerator.register_save_state_pre_hook(on_save)


def check_checkpoint(ckpt_dir: Path, model) -> None:
    """The partial checkpoint holds every trainable weight (load_state runs with strict=False)."""
    path = ckpt_dir / "model.safetensors"
    if not path.is_file():
        raise InputError(f"{path}: missing from the checkpoint (was it written by this trainer?)")
    with safe_open(str(path), framework="pt") as f:
        have = {_plain_name(k) for k in f.keys()}
    missing = sorted(trainable_names(model) - have)
    if missing:
        raise InputError(f"{path}: lacks {len(missing)} trainable weights (e.g. {missing[0]}); "
                         "was it written with other --lora-* settings?")
