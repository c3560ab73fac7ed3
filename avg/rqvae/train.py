"""Train the RQ-VAE image tokenizer with semantic alignment (AVG eqs. 2-6).

    python -m avg.rqvae.train --emb-dir out/emb --out-dir out/rqvae [--epochs 50 ...]
    accelerate launch -m avg.rqvae.train ...      # multi-GPU, same flags

Reads the ``emb/`` memmaps batch by batch; the alignment loss (eq. 5) uses ONE caption per image
per epoch, drawn with a seeded generator from the captions of *training* images only. Writes
``out_dir/{model.safetensors, config.json, train_args.json, train.log, metrics.jsonl,
final_metrics.json, checkpoints/last.pt, stage.json}``. Resuming (on CPU with a fixed seed,
bit-identical to an uninterrupted run) is automatic: re-running the same command after a kill
continues from ``checkpoints/last.pt`` when ``stage.json`` says a run of this configuration was
interrupted. ``--resume`` asks for it explicitly (it also continues a finished run). A different
configuration is refused unless ``--force``; a forced or repeated finished run starts fresh and
first deletes the old checkpoints and weights, so nothing stale can be picked up.
"""
from __future__ import annotations

import argparse
import math
import random
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from avg.artifacts.registry import manifest_name
from avg.utils.progress import tqdm

from avg.models.rqvae import RQVAE, RQVAEConfig
from avg.rqvae.data import FeatureBatchSampler, FeatureDataset, gather_rows, iter_feature_batches, passthrough_collate, training_rows
from avg.artifacts.emb import INDEX, load_emb
from avg.artifacts.codes import collision_stats
from avg.models.kmeans import DeadCodeTracker, init_codebooks
from avg.utils.io import InputError, atomic_path, write_json
from avg.utils.seed import deterministic_algorithms, set_seed
from avg.utils.stages import add_force_arg, begin_stage, config_diff, skip_if_done
from avg.utils.tracking import RunLogger, get_logger
from avg.utils.cli import run_main

CHECKPOINT = "last.pt"


def _hidden_dims(text: str) -> list[int]:
    try:
        dims = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden-dims: expected comma-separated integers, got {text!r}") from None
    if any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError("--hidden-dims: sizes must be positive")
    return dims


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avg.rqvae.train", description=__doc__.split("\n\n")[0])
    io = p.add_argument_group("data and output")
    io.add_argument("--emb-dir", required=True, help="emb/ artifact from prepare_emb (image + caption feature memmaps and index)")
    io.add_argument("--out-dir", required=True, help="output directory (weights, config, logs, checkpoints/)")
    io.add_argument("--train-splits", default="train", help="comma-separated image splits to train on; only their captions enter the alignment loss")
    io.add_argument("--eval-splits", default="val", help="comma-separated splits whose losses are logged every --eval-every epochs (missing splits are skipped)")
    io.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes gathering batches from the memmaps")
    io.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoints/last.pt (same flags as the interrupted run); "
                    "not needed after a kill: re-running the same command resumes an interrupted run automatically")
    io.add_argument("--stop-after-epochs", "--stop-after", dest="stop_after", type=int, default=0,
                    help="stop after this many epochs of this invocation (time-limited jobs); --resume continues; 0: run to "
                         "--epochs (--stop-after: the old name, kept for one release)")
    io.add_argument("--save-every", type=int, default=0, help="also keep checkpoints/epoch_XXXX.pt every N epochs (last.pt is written every epoch); 0: only last.pt")
    io.add_argument("--eval-every", type=int, default=1, help="log eval-split losses every N epochs; 0 disables")
    io.add_argument("--run-name", default=None, help="run name for logs and wandb (default: out-dir's name)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=50, help="training epochs over the training images")
    opt.add_argument("--batch-size", type=int, default=2048, help="images per batch per process (paper: 2048 per GPU)")
    opt.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (paper: 1e-4)")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on encoder/decoder weight matrices (never on codebooks or biases)")
    opt.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine", help="learning-rate schedule after warm-up")
    opt.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    opt.add_argument("--max-grad-norm", "--grad-clip", dest="grad_clip", type=float, default=1.0,
                     help="clip the gradient norm to this value; 0 disables (the retrievers' and reranker's flag name; "
                          "--grad-clip: the old name, kept for one release)")
    opt.add_argument("--seed", type=int, default=42, help="seed for init, k-means, batch order, caption sampling and dead-code resets")
    m = p.add_argument_group("model")
    m.add_argument("--num-levels", type=int, default=4, help="M: residual quantization steps = vokens per image (paper: 4)")
    m.add_argument("--codebook-size", type=int, default=1024, help="N: vokens per codebook (paper: 1024)")
    books = m.add_mutually_exclusive_group()
    books.add_argument("--shared-codebook", dest="shared_codebook", action="store_true", default=True, help="one codebook used at every step (paper; default)")
    books.add_argument("--per-level-codebooks", dest="shared_codebook", action="store_false", help="a separate codebook for each quantization step")
    m.add_argument("--latent-dim", type=int, default=64, help="dimension of the latent space that is quantized")
    m.add_argument("--hidden-dims", type=_hidden_dims, default=[512, 256], help="comma-separated hidden sizes of the MLP encoder (decoder mirrors them), e.g. 512,256")
    m.add_argument("--activation", default="gelu", choices=["relu", "gelu", "silu", "tanh"], help="MLP activation")
    m.add_argument("--dropout", type=float, default=0.0, help="dropout inside the MLPs")
    m.add_argument("--codebook-update", choices=["loss", "ema"], default="loss", help="learn the codebook by the codebook loss term or by EMA of assigned residuals")
    m.add_argument("--ema-decay", type=float, default=0.99, help="EMA decay for --codebook-update ema")
    lw = p.add_argument_group("loss weights (eq. 6)")
    lw.add_argument("--recon-weight", type=float, default=1.0, help="weight of the reconstruction loss (eq. 3)")
    lw.add_argument("--commit-weight", type=float, default=0.25, help="weight of the commitment loss (eq. 4)")
    lw.add_argument("--codebook-weight", type=float, default=1.0, help="weight of the codebook loss (ignored with --codebook-update ema)")
    lw.add_argument("--align-weight", type=float, default=1.0, help="weight of the semantic alignment loss (eq. 5); 0 = the paper's 'w/o cross-modal alignment' ablation")
    km = p.add_argument_group("codebook initialisation and dead codes")
    km.add_argument("--kmeans-init", action=argparse.BooleanOptionalAction, default=True, help="initialise codebooks by k-means on encoder latents of a training sample")
    km.add_argument("--kmeans-samples", type=int, default=20000, help="training images sampled for the k-means initialisation")
    km.add_argument("--kmeans-shared-init", choices=["levels", "latents"], default="levels", help="data for a shared codebook's k-means: 'levels' fits N/M entries to each level's residuals, 'latents' fits all N to level-1 latents (see avg/models/kmeans.py)")
    km.add_argument("--kmeans-iters", type=int, default=25, help="Lloyd iterations for the k-means initialisation")
    km.add_argument("--dead-code-threshold", type=int, default=100, help="reset codes unused for this many optimizer steps to random current residuals; 0 disables")
    add_force_arg(p)
    return p


def model_config(args, input_dim: int) -> RQVAEConfig:
    return RQVAEConfig(
        input_dim=input_dim, hidden_dims=args.hidden_dims, latent_dim=args.latent_dim, num_levels=args.num_levels,
        codebook_size=args.codebook_size, shared_codebook=args.shared_codebook, activation=args.activation,
        dropout=args.dropout, recon_weight=args.recon_weight, commit_weight=args.commit_weight,
        codebook_weight=args.codebook_weight, align_weight=args.align_weight, codebook_update=args.codebook_update,
        ema_decay=args.ema_decay,
    )


def _rng_state() -> dict:
    """Every RNG a run touches, as tensors/lists/numbers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@torch.no_grad()
def code_metrics(model: RQVAE, features: np.ndarray, rows: np.ndarray, batch_size: int, device) -> dict:
    """Collision rate, codebook usage and perplexity per level over the images ``rows``."""
    model.eval()
    codes = torch.cat([model.encode(b.to(device)).cpu() for _, b in iter_feature_batches(features, batch_size, rows)]).numpy()
    stats = collision_stats(codes, model.config.codebook_size)
    out = {"codes/collision_rate": stats["collision_rate"], "codes/largest_group": stats["largest_group"]}
    for d, lv in enumerate(stats["levels"]):
        out[f"codes/usage_l{d + 1}"] = lv["usage"]
        out[f"codes/perplexity_l{d + 1}"] = lv["perplexity"]
    return out


@torch.no_grad()
def eval_losses(model: RQVAE, emb, rows: np.ndarray, captions, batch_size: int, device, prefix: str) -> dict:
    """Mean loss terms over ``rows`` with each image's first caption (deterministic)."""
    model.eval()
    sums: dict = defaultdict(float)
    ds = FeatureDataset(emb.image_features, emb.text_features)
    first = np.full(len(rows), -1, dtype=np.int64)
    has = captions.counts > 0
    first[has] = captions.flat[captions.offsets[:-1][has]]
    for s in range(0, len(rows), batch_size):
        b = ds.__getitems__(list(zip(rows[s : s + batch_size].tolist(), first[s : s + batch_size].tolist())))
        out = model(b["image"].to(device), text=b["text"].to(device), text_mask=b["text_mask"].to(device))
        for k, v in out.losses.items():
            sums[k] += float(v) * len(b["image"])
    return {f"{prefix}/{k}": v / max(1, len(rows)) for k, v in sums.items()}


def train(args) -> dict:
    from accelerate import Accelerator

    out_dir = Path(args.out_dir)
    emb_dir = Path(args.emb_dir)
    ckpt_path = out_dir / "checkpoints" / CHECKPOINT
    for name in ("epochs", "batch_size", "num_levels", "codebook_size", "latent_dim"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if args.resume and not ckpt_path.is_file():
        raise InputError(f"{ckpt_path}: no checkpoint to resume from")

    accelerator = Accelerator()
    main_proc = accelerator.is_main_process
    set_seed(args.seed)
    emb = load_emb(emb_dir)
    splits = [s for s in args.train_splits.split(",") if s]
    image_rows, captions = training_rows(emb, splits, str(emb_dir / INDEX))
    config = model_config(args, emb.dim)

    def load_checkpoint() -> dict:
        try:  # weights_only: a checkpoint file can never run code
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated file, not a torch file, or pickled objects weights_only refuses
            raise InputError(f"{ckpt_path}: not a readable train_rqvae checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(ckpt, dict) or not {"config", "model", "epoch"} <= set(ckpt):
            raise InputError(f"{ckpt_path}: not a train_rqvae checkpoint (expected keys config, model, epoch, ...)")
        if ckpt["config"] != config.to_dict():
            diff = "; ".join(config_diff(ckpt["config"], config.to_dict()))  # checkpoint -> flags
            raise InputError(f"{ckpt_path}: the checkpoint's model configuration differs from the flags given ({diff}); "
                             "resume with the flags it was made with, or start a fresh run in a new --out-dir")
        return ckpt

    state = load_checkpoint() if args.resume else None  # an explicit --resume is checked like any input
    # every rank reads the manifest before the main process rewrites it, so all take the same decision
    run = begin_stage(out_dir, manifest_name("train_rqvae"), vars(args), inputs=[emb_dir], force=args.force,
                      ignore=("eval_every",), mark_running=False)
    accelerator.wait_for_everyone()
    if run.up_to_date and skip_if_done():
        get_logger("avg.rqvae").info("train_rqvae: outputs in %s are complete and up to date; skipping", out_dir)
        return dict(run.previous.get("summary") or {})
    interrupted = not run.fresh and run.previous.get("status") == "running"
    resume = args.resume or (interrupted and ckpt_path.is_file())
    if resume and state is None:
        state = load_checkpoint()
    if not resume and main_proc:  # a fresh run: nothing of an earlier run may be picked up or reported
        shutil.rmtree(ckpt_path.parent, ignore_errors=True)
        for name in ("model.safetensors", "final_metrics.json"):
            (out_dir / name).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    run.running()
    model = RQVAE(config)
    tracker = DeadCodeTracker(config.num_books, config.codebook_size, config.num_levels, args.dead_code_threshold, seed=args.seed + 1)

    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        if prm.requires_grad:
            (decay if prm.ndim >= 2 and name != "codebooks" else no_decay).append(prm)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)

    sampler = FeatureBatchSampler(image_rows, captions, args.batch_size, seed=args.seed)
    loader = DataLoader(FeatureDataset(emb.image_features, emb.text_features), batch_sampler=sampler, collate_fn=passthrough_collate, num_workers=args.num_workers)

    start_epoch, step = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        tracker.load_state_dict(state["dead_code"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
    elif args.kmeans_init:
        sample = np.sort(np.random.default_rng(args.seed).choice(image_rows, size=min(args.kmeans_samples, len(image_rows)), replace=False))
        inertia = init_codebooks(model, gather_rows(emb.image_features, sample), seed=args.seed, iters=args.kmeans_iters, shared_init=args.kmeans_shared_init)
        kmeans_info = {"kmeans/samples": len(sample), **{f"kmeans/inertia_b{b}": v for b, v in enumerate(inertia)}}
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    raw_model = accelerator.unwrap_model(model)
    device = accelerator.device
    steps_per_epoch = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args.lr_schedule, args.warmup_steps, args.epochs * steps_per_epoch))
    if state is not None:  # after the scheduler's constructor, which resets the lr
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    run_name = args.run_name or out_dir.name
    logger = RunLogger(out_dir, project="avg-rqvae", run_name=run_name, config=None, resume=resume)
    if resume:
        logger.warning("resuming from %s (epoch %d, step %d)%s", ckpt_path, start_epoch, step,
                       "" if args.resume else ": this configuration was interrupted here")
    arg_dict = {k: v for k, v in vars(args).items()}
    if main_proc:
        write_json(arg_dict, out_dir / "train_args.json")
        if logger.wandb_run is not None:
            logger.wandb_run.config.update({**arg_dict, "model": config.to_dict()}, allow_val_change=True)
    eval_sets = []
    for s in [s for s in args.eval_splits.split(",") if s]:
        if s in splits:
            continue
        rows = emb.image_rows(s)
        if len(rows):
            eval_sets.append((s, *training_rows(emb, [s], str(emb_dir / INDEX))))
    logger.info(
        "training on %d images of split(s) %s (%d with captions), %d steps/epoch, %d processes; model %s",
        len(image_rows), splits, int((captions.counts > 0).sum()), steps_per_epoch, accelerator.num_processes, config.to_dict(),
    )
    if not resume and args.kmeans_init:
        logger.log(kmeans_info, step=0)

    if state is not None:  # last, so nothing after it draws from the restored generators
        _set_rng_state(state["rng"])
        state = None
    metrics: dict = {}
    end_epoch = min(args.epochs, start_epoch + args.stop_after) if args.stop_after > 0 else args.epochs
    for epoch in range(start_epoch, end_epoch):
        sampler.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):  # accelerate's loader re-sets the sampler's epoch on iter
            loader.set_epoch(epoch)
        model.train()
        sums: dict = defaultdict(float)
        seen, reset_epoch = 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not accelerator.is_local_main_process, leave=False, mininterval=2.0)
        for batch in bar:
            out = model(batch["image"], text=batch["text"], text_mask=batch["text_mask"])
            accelerator.backward(out.loss)
            if args.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if tracker.threshold > 0:
                tracker.update(accelerator.gather(out.codes))
                if bool(tracker.dead_mask().any()):
                    reset_epoch += tracker.reset(raw_model, accelerator.gather(out.residuals))
            n = len(batch["image"])
            seen += n
            for k, v in out.losses.items():
                sums[k] += float(v) * n
            bar.set_postfix(loss=f"{float(out.losses['total']):.4f}")
        totals = accelerator.reduce(torch.tensor([seen, *sums.values()], dtype=torch.float64, device=device), "sum").cpu()
        metrics = {f"train/{k}": float(v) / float(totals[0]) for k, v in zip(sums.keys(), totals[1:])}
        metrics.update({"epoch": epoch + 1, "train/lr": scheduler.get_last_lr()[0], "train/dead_codes_reset": reset_epoch})
        if main_proc:
            metrics.update(code_metrics(raw_model, emb.image_features, image_rows, args.batch_size, device))
            if args.eval_every > 0 and (epoch + 1) % args.eval_every == 0:
                for name, rows, caps in eval_sets:
                    metrics.update(eval_losses(raw_model, emb, rows, caps, args.batch_size, device, f"eval/{name}"))
        logger.log(metrics, step=step)
        accelerator.wait_for_everyone()
        if main_proc:
            ckpt = {
                "model": {k: v.detach().cpu() for k, v in raw_model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "dead_code": tracker.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "rng": _rng_state(),
                "config": config.to_dict(),
            }
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(ckpt_path) as tmp:
                torch.save(ckpt, tmp)
            if args.save_every > 0 and (epoch + 1) % args.save_every == 0:
                with atomic_path(ckpt_path.with_name(f"epoch_{epoch + 1:04d}.pt")) as tmp:
                    shutil.copyfile(ckpt_path, tmp)
        accelerator.wait_for_everyone()

    final = dict(metrics)
    if end_epoch < args.epochs:
        logger.info("stopped after epoch %d of %d (--stop-after-epochs); continue with --resume", end_epoch, args.epochs)
        logger.finish()
        return final
    if main_proc:
        if not final:  # resumed a finished run: report the current model
            final = code_metrics(raw_model, emb.image_features, image_rows, args.batch_size, device)
        final.update({"step": step, "num_train_images": int(len(image_rows))})
        raw_model.save_pretrained(out_dir)
        write_json(final, out_dir / "final_metrics.json")
        logger.summary(final)
        logger.info("saved %s and config.json to %s", "model.safetensors", out_dir)
        run.complete(final)
    logger.finish()
    accelerator.wait_for_everyone()
    return final


def main(argv: Optional[Sequence[str]] = None) -> dict:
    # on the CPU the codebook's gradient (a scatter-add over the batch) sums in thread order: without
    # deterministic kernels two runs of the same seed drift apart (25.7 % vs 24.3 % raw collisions on the demo)
    with deterministic_algorithms(enabled=not torch.cuda.is_available()):
        return train(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_main(main)
