"""Train the RQ-VAE image tokenizer with semantic alignment (AVG eqs. 2-6).

    python -m avg.stages.train_rqvae --emb-dir out/prepare_emb --out-dir out/train_rqvae [--epochs 50 ...]
    accelerate launch -m avg.stages.train_rqvae ...      # multi-GPU, same flags

Reads the ``prepare_emb/`` memmaps batch by batch; the alignment loss (eq. 5) uses ONE caption per image
per epoch, drawn with a seeded generator from the captions of *training* images only. Runs on the
shared training loop (:func:`avg.train.loop.train_epochs`): the same checkpoints, resume and stop
flags as the retrievers and the reranker; the dead-code resets run after each optimizer step.
Writes ``out_dir/{model.safetensors, config.json, train_args.json, train.log, metrics.jsonl,
final_metrics.json, checkpoints/last/, stage.json}``. Resuming (on CPU with a fixed seed,
bit-identical to an uninterrupted run) is automatic: re-running the same command after a kill
continues from ``checkpoints/last`` when ``stage.json`` says a run of this configuration was
interrupted. ``--resume`` asks for it explicitly (it also continues a finished run). A different
configuration is refused unless ``--force``; a forced or repeated finished run starts fresh and
first deletes the old checkpoints and weights, so nothing stale can be picked up.
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from avg.artifacts.codes import collision_stats
from avg.artifacts.emb import INDEX, load_emb
from avg.artifacts.registry import manifest_name
from avg.models.kmeans import DeadCodeTracker, init_codebooks
from avg.models.layout import CONFIG_NAME as LAYOUT_CONFIG, WEIGHTS_NAME as LAYOUT_WEIGHTS
from avg.models.layout import LAYOUT_MODES, LAYOUT_SCORES, LayoutConfig, LayoutQuantizer, layout_arrays
from avg.models.rqvae import RQVAE, RQVAEConfig
from avg.rqvae.data import FeatureBatchSampler, FeatureDataset, gather_rows, iter_feature_batches, passthrough_collate, training_rows
from avg.train.loop import (STATE_FILE, add_checkpoint_args, checkpoint_dir, configure_deepspeed, log_resumed,
                            log_stopped, make_accelerator, resume_from, start_training_run, train_epochs)
from avg.core.cli import add_device_arg, run_main
from avg.core.io import InputError, read_json, write_json
from avg.core.seed import deterministic_algorithms, seeded_generator, set_seed
from avg.core.stages import add_force_arg, config_diff
from avg.core.tracking import get_logger

def _hidden_dims(text: str) -> list[int]:
    try:
        dims = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden-dims: expected comma-separated integers, got {text!r}") from None
    if any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError("--hidden-dims: sizes must be positive")
    return dims


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avg.stages.train_rqvae", description=__doc__.split("\n\n")[0])
    io = p.add_argument_group("data and output")
    io.add_argument("--emb-dir", required=True, help="prepare_emb/ artifact from prepare_emb (image + caption feature memmaps and index)")
    io.add_argument("--out-dir", required=True, help="output directory (weights, config, logs, checkpoints/)")
    io.add_argument("--train-splits", default="train", help="comma-separated image splits to train on; only their captions enter the alignment loss")
    io.add_argument("--eval-splits", default="val", help="comma-separated splits whose losses are logged every --eval-every epochs (missing splits are skipped)")
    io.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes gathering batches from the memmaps")
    io.add_argument("--eval-every", type=int, default=1, help="log eval-split losses every N epochs; 0 disables")
    add_checkpoint_args(p, log_every=0, wandb_project="avg-rqvae")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=50, help="training epochs over the training images")
    opt.add_argument("--batch-size", type=int, default=2048, help="images per batch per process (paper: 2048 per GPU)")
    opt.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (paper: 1e-4)")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on encoder/decoder weight matrices (never on codebooks or biases)")
    opt.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine", help="learning-rate schedule after warm-up")
    opt.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this value; 0 disables")
    add_device_arg(opt)
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
    lay = p.add_argument_group("layout vokens (avg.models.layout): codes from the ViT's patch grid after the M vokens")
    lay.add_argument("--layout", choices=("none", *LAYOUT_MODES), default="none",
                     help="none: the paper's M vokens of the pooled vector; residual: --layout-levels residual k-means "
                          "levels over the whole grid; regions: one voken per region of the grid (needs "
                          "prepare_emb/image_grid.npy, i.e. prepare_emb --image-grid)")
    lay.add_argument("--layout-levels", type=int, default=2, help="layout vokens per image (regions: 1-4)")
    lay.add_argument("--layout-size", type=int, default=0, help="k-means entries per layout level (0: --codebook-size; "
                     "a coarse layout, e.g. 16, keeps every branch in the beam)")
    lay.add_argument("--layout-position", choices=("first", "last"), default="first",
                     help="first: the layout vokens open the code (they weigh the branches of the search); last: after "
                          "the RQ-VAE's M (with --layout-score level they add the caption's evidence about the layout "
                          "to every image's score)")
    lay.add_argument("--layout-score", choices=LAYOUT_SCORES, default="level",
                     help="how the retriever scores a layout voken: level (log-softmax over the layout level's whole "
                          "alphabet: how likely the caption makes this layout, for every image alike) or children (over "
                          "the continuations the gallery allows after the prefix, like the other vokens; after a prefix "
                          "that leaves one image it is log 1 = 0)")
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


def check_checkpoint_config(ckpt_dir: Path, config: RQVAEConfig) -> None:
    """A checkpoint of another model configuration is an error naming the settings that differ
    (checkpoint -> flags), raised before anything is loaded or written."""
    path = ckpt_dir / STATE_FILE
    saved = read_json(path)
    if not isinstance(saved, dict) or "model_config" not in saved:
        raise InputError(f"{path}: not a train_rqvae checkpoint (no model_config); start a fresh run (--force)")
    if saved["model_config"] != config.to_dict():
        diff = "; ".join(config_diff(saved["model_config"], config.to_dict()))
        raise InputError(f"{path}: the checkpoint's model configuration differs from the flags given ({diff}); "
                         "resume with the flags it was made with, or start a fresh run in a new --out-dir")


def train(args) -> dict:
    out_dir = Path(args.out_dir)
    emb_dir = Path(args.emb_dir)
    ckpt_dir = checkpoint_dir(out_dir)
    for name in ("epochs", "batch_size", "num_levels", "codebook_size", "latent_dim"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")

    accelerator = make_accelerator(args.device)
    main_proc = accelerator.is_main_process
    set_seed(args.seed)
    emb = load_emb(emb_dir)
    if args.layout != "none" and not 0 <= args.layout_size <= args.codebook_size:
        raise InputError(f"--layout-size {args.layout_size}: between 1 and --codebook-size {args.codebook_size} "
                         "(one alphabet per code)")
    if args.layout != "none" and emb.image_grid is None:
        raise InputError(f"{emb_dir}: --layout {args.layout} reads the patch grid, and there is no {emb_dir}/image_grid.npy: "
                         "run prepare_emb with --image-grid G (EMB_IMAGE_GRID=4)")
    splits = [s for s in args.train_splits.split(",") if s]
    image_rows, captions = training_rows(emb, splits, str(emb_dir / INDEX))
    config = model_config(args, emb.dim)
    if (ckpt_dir.parent / "last.pt").is_file() and not (ckpt_dir / STATE_FILE).is_file():
        get_logger("avg.rqvae").warning("%s: a checkpoint of an older release (before the shared training loop); "
                                        "it is not read: this run starts fresh", ckpt_dir.parent / "last.pt")
    checked = args.resume and (ckpt_dir / STATE_FILE).is_file()
    if checked:  # an explicit --resume is checked like any input, before the manifest
        check_checkpoint_config(ckpt_dir, config)
    started = start_training_run(accelerator, args, out_dir, manifest_name("train_rqvae"), inputs=[emb_dir],
                                 run_name=args.run_name or out_dir.name, logger_name="avg.rqvae",
                                 ignore=("eval_every",), stale=("checkpoints", "model.safetensors", "final_metrics.json",
                                                                LAYOUT_WEIGHTS, LAYOUT_CONFIG))
    if started.skipped is not None:
        return started.skipped
    run, logger, resuming = started.stage, started.logger, started.resuming
    if resuming and not checked:
        check_checkpoint_config(ckpt_dir, config)

    model = RQVAE(config)
    tracker = DeadCodeTracker(config.num_books, config.codebook_size, config.num_levels, args.dead_code_threshold, seed=args.seed + 1)
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        if prm.requires_grad:
            (decay if prm.ndim >= 2 and name != "codebooks" else no_decay).append(prm)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    sampler = FeatureBatchSampler(image_rows, captions, args.batch_size, seed=args.seed,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)
    dataset = FeatureDataset(emb.image_features, emb.text_features)
    kmeans_info = None
    if not resuming and args.kmeans_init:
        sample = np.sort(np.random.default_rng(args.seed).choice(image_rows, size=min(args.kmeans_samples, len(image_rows)), replace=False))
        inertia = init_codebooks(model, gather_rows(emb.image_features, sample), seed=args.seed, iters=args.kmeans_iters, shared_init=args.kmeans_shared_init)
        kmeans_info = {"kmeans/samples": len(sample), **{f"kmeans/inertia_b{b}": v for b, v in enumerate(inertia)}}
    configure_deepspeed(accelerator, micro_batch=args.batch_size, max_grad_norm=args.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    device = accelerator.device
    steps_per_epoch = sampler.batches_per_epoch()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args.lr_schedule, args.warmup_steps, args.epochs * steps_per_epoch))
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "model_config": config.to_dict(),
             "dead_code": tracker.state_dict(), "epoch_sums": {}, "scheduler": scheduler.state_dict()}

    arg_dict = dict(vars(args))
    if main_proc:
        write_json(arg_dict, out_dir / "train_args.json")
        if logger.wandb_run is not None:
            logger.wandb_run.config.update({"model": config.to_dict()}, allow_val_change=True)
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
    if kmeans_info is not None:
        logger.log(kmeans_info, step=0)
    # state["epoch_sums"]: this epoch's sums over all processes (images seen, loss x images, dead codes
    # reset), checkpointed with the counters, so an epoch resumed mid-way still reports the whole epoch
    last_out: list = [None]  # the micro-step's output, for the dead-code update after the optimizer step
    metrics: dict = {}
    if resuming:  # last, so nothing after it draws from the restored generators
        resume_from(accelerator, ckpt_dir, scheduler, state, models=[model])
        try:
            tracker.load_state_dict(state["dead_code"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"{ckpt_dir / STATE_FILE}: unreadable dead-code state ({type(e).__name__}: {e}); "
                             "start a fresh run (--force)") from None
        log_resumed(logger, ckpt_dir, state, explicit=args.resume)

    def micro_step(batch, epoch: int, micro: int):
        out = model(batch["image"].to(device), text=batch["text"].to(device), text_mask=batch["text_mask"].to(device))
        last_out[0] = (out, len(batch["image"]))
        return out.loss, {k: float(v) for k, v in out.losses.items() if k != "total"}

    def after_step() -> None:  # one micro-step per optimizer step (no accumulation)
        (out, n), sums = last_out[0], state["epoch_sums"]
        keys = ["seen", *out.losses]
        values = [float(n), *(float(v) * n for v in out.losses.values())]
        if accelerator.num_processes > 1:  # every process keeps the same global sums (one small all-reduce)
            values = accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=device), "sum").tolist()
        for k, v in zip(keys, values):
            sums[k] = sums.get(k, 0.0) + v
        if tracker.threshold > 0:  # dead-code resets see every process's codes and residuals
            tracker.update(accelerator.gather(out.codes))
            if bool(tracker.dead_mask().any()):
                reset = tracker.reset(raw_model, accelerator.gather(out.residuals))
                sums["dead_codes_reset"] = sums.get("dead_codes_reset", 0) + reset
            state["dead_code"] = tracker.state_dict()  # ~40 us (a 1024-entry book): cheap enough to keep current
        last_out[0] = None

    def on_epoch_end(done: int) -> None:
        sums, state["epoch_sums"] = state["epoch_sums"], {}
        reset, seen = sums.pop("dead_codes_reset", 0), sums.pop("seen", 0.0)
        metrics.clear()
        metrics.update({f"train/{k}": v / max(seen, 1.0) for k, v in sums.items()})
        metrics.update({"epoch": done, "train/lr": scheduler.get_last_lr()[0], "train/dead_codes_reset": int(reset)})
        if main_proc:
            metrics.update(code_metrics(raw_model, emb.image_features, image_rows, args.batch_size, device))
            if args.eval_every > 0 and done % args.eval_every == 0:
                for name, rows, caps in eval_sets:
                    metrics.update(eval_losses(raw_model, emb, rows, caps, args.batch_size, device, f"eval/{name}"))
        logger.log(metrics, step=state["global_step"])
        model.train()

    def fetch(index_batches: list):
        # its own generator: a DataLoader draws its workers' base seed when iterated, and a draw from
        # torch's global RNG would shift the dropout of a run resumed mid-epoch against an uninterrupted one
        return DataLoader(dataset, batch_sampler=index_batches, collate_fn=passthrough_collate,
                          num_workers=args.num_workers, generator=seeded_generator(args.seed, state["epoch"]))

    result = train_epochs(accelerator, args, state, sampler=sampler, micro_per_epoch=steps_per_epoch, model=model,
                          params=list(model.parameters()), optimizer=optimizer, scheduler=scheduler, ckpt_dir=ckpt_dir,
                          logger=logger, micro_step=micro_step, on_epoch_start=lambda epoch: model.train(),
                          on_epoch_end=on_epoch_end,
                          after_step=after_step, fetch=fetch)
    final = dict(metrics)
    if result["stopped"]:
        log_stopped(logger, result["stopped"], state, args.epochs, result["steps_this_run"])
        logger.finish()
        return final
    if main_proc:
        if not final:  # resumed a finished run: report the current model
            final = code_metrics(raw_model, emb.image_features, image_rows, args.batch_size, device)
        final.update({"step": state["global_step"], "num_train_images": int(len(image_rows))})
        raw_model.save_pretrained(out_dir)
        if args.layout != "none":
            layout = fit_layout(args, emb, image_rows)
            layout.save_pretrained(out_dir)
            final.update({"layout/levels": layout.config.levels, "layout/mode": layout.config.mode,
                          "layout/position": args.layout_position, "layout/score": args.layout_score})
            logger.info("layout vokens: %s, %d levels of %d entries over the %d-cell grid (PCA to %d), fitted on %d images",
                        args.layout, layout.config.levels, layout.config.codebook_size, layout.config.cells,
                        layout.config.dim, len(image_rows))
        write_json(final, out_dir / "final_metrics.json")
        logger.summary(final)
        logger.info("saved %s and config.json to %s", "model.safetensors", out_dir)
        run.complete(final)
    logger.finish()
    accelerator.wait_for_everyone()
    return final


def fit_layout(args, emb, image_rows: np.ndarray) -> LayoutQuantizer:
    """The layout quantizer of the training images' grids: --layout-levels codebooks of --codebook-size entries in the
    RQ-VAE's latent width (one alphabet size and vector width for every voken of a code)."""
    size = args.layout_size or args.codebook_size
    cfg = LayoutConfig(mode=args.layout, levels=args.layout_levels, codebook_size=size, dim=args.latent_dim,
                       position=args.layout_position, score=args.layout_score)
    return LayoutQuantizer.fit(layout_arrays(emb.image_grid, np.sort(image_rows)), cfg, seed=args.seed)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    # on the CPU the codebook's gradient (a scatter-add over the batch) sums in thread order: without
    # deterministic kernels two runs of the same seed drift apart (25.7 % vs 24.3 % raw collisions on the demo)
    with deterministic_algorithms(enabled=not torch.cuda.is_available()):
        return train(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_main(main)
