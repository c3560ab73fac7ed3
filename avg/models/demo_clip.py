"""Train the small demo CLIP (``avg-demo-vit``) on the generated demo dataset, on the CPU.

No CLIP weights can be downloaded on the development machines, so the demo brings its own: an
open_clip architecture (``clip_configs/avg-demo-vit.json``) trained contrastively on the demo
TRAIN split and saved as an ordinary open_clip checkpoint, which ``prepare_emb`` then loads
exactly as it loads ViT-L/14 (``create_model_and_transforms("avg-demo-vit", pretrained=FILE)``).

Training is plain CLIP: symmetric InfoNCE over in-batch pairs with a learnable temperature,
AdamW with warmup + cosine decay. Images and tokens are preprocessed once and kept in memory
(the demo images are 64 px), so a step is pure tensor work. No augmentation: flips would break
the captions' left/right words and crops their positions.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from avg.core.progress import tqdm

DEMO_CLIP_MODEL = "avg-demo-vit"
CHECKPOINT_NAME = "avg_demo_clip.pt"


@dataclass
class DemoClipConfig:
    model: str = DEMO_CLIP_MODEL
    epochs: float = 10.0
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 2e-5
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    seed: int = 0
    max_steps: Optional[int] = None  # stop early (timing runs)
    threads: Optional[int] = None


def preload_images(paths: Sequence[os.PathLike], transform, progress: bool = True) -> torch.Tensor:
    """Decode and preprocess every image once; fp16 storage halves memory (~25 KB per 64 px image)."""
    from avg.data.images import load_rgb

    first = transform(load_rgb(paths[0]))
    out = torch.empty((len(paths), *first.shape), dtype=torch.float16)
    out[0] = first
    for i in tqdm(range(1, len(paths)), desc="load images", unit="img", disable=not progress, initial=1, total=len(paths)):
        out[i] = transform(load_rgb(paths[i]))
    return out


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Decay matrices only (open_clip's rule): no decay on gains, biases, embeddings' scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, total: int, cfg: DemoClipConfig) -> float:
    warmup = max(1, int(cfg.warmup_frac * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def clip_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: pair i is the positive of row i and of column i."""
    logits = logit_scale.exp() * image_feats @ text_feats.T
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def train_clip(model, pixels: torch.Tensor, tokens: torch.Tensor, caption_image: torch.Tensor, cfg: DemoClipConfig, logger=None, progress: bool = True) -> dict:
    """Contrastive training in place. `tokens[j]` describes image `caption_image[j]`.

    Each epoch visits every image once in a seeded random order, paired with one of its
    captions drawn at random, so all captions are used over the epochs.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    n_images = len(pixels)
    batch = min(cfg.batch_size, n_images)
    steps_per_epoch = max(1, n_images // batch)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    caps_of = [[] for _ in range(n_images)]
    for j, i in enumerate(caption_image.tolist()):
        caps_of[i].append(j)
    n_caps = torch.tensor([len(c) for c in caps_of])
    if bool((n_caps == 0).any()):
        raise ValueError("train_clip: every image needs at least one caption")
    max_caps = int(n_caps.max())
    cap_table = torch.tensor([c + [c[0]] * (max_caps - len(c)) for c in caps_of])

    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    model.train()
    t0, c0 = time.time(), time.process_time()
    order = torch.empty(0, dtype=torch.long)
    loss_ema = None
    bar = tqdm(range(total), desc="train demo CLIP", unit="step", disable=not progress)
    for step in bar:
        if len(order) < batch:
            order = torch.randperm(n_images, generator=gen)
        idx, order = order[:batch], order[batch:]
        pick = (torch.rand(batch, generator=gen) * n_caps[idx]).long()
        cap_idx = cap_table[idx, pick]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, cfg)
        img = F.normalize(model.encode_image(pixels[idx].float()), dim=-1)
        txt = F.normalize(model.encode_text(tokens[cap_idx]), dim=-1)
        loss = clip_loss(img, txt, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.3f}")
        if logger is not None and (step % 50 == 0 or step == total - 1):
            logger.log({"train/loss": loss.item(), "train/lr": opt.param_groups[0]["lr"], "train/logit_scale": model.logit_scale.exp().item()}, step=step)
    model.eval()
    elapsed, cpu = time.time() - t0, time.process_time() - c0
    # cpu seconds (all threads) are a steadier measure than wall time on a shared machine
    return {"steps": total, "epochs": total / steps_per_epoch, "batch_size": batch, "train_seconds": round(elapsed, 2), "seconds_per_step": round(elapsed / total, 4),
            "cpu_seconds_per_step": round(cpu / total, 4), "threads": torch.get_num_threads(), "final_loss_ema": loss_ema}


def save_open_clip_checkpoint(model, path: os.PathLike, extra: Optional[dict] = None) -> Path:
    """``{"state_dict": ..., **extra}`` written atomically; loads with open_clip's weights_only load."""
    from avg.core.io import atomic_path

    path = Path(path)
    payload = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}
    if extra:
        payload.update(extra)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def zero_shot_test(checkpoint: os.PathLike, json_path: os.PathLike, image_root: os.PathLike, out_dir: os.PathLike, *, split: str = "test", model_name: str = DEMO_CLIP_MODEL, batch_size: int = 256, progress: bool = True) -> dict:
    """Reload the saved checkpoint the way prepare_emb does, and score text->image retrieval.

    Queries: every caption of `split`; gallery: the images of `split`. Writes
    ``run_<split>.jsonl`` (top 100) and returns retrieval_metrics of it.
    """
    from avg.data.karpathy import load_karpathy
    from avg.search.exact import exact_search
    from avg.metrics import retrieval_metrics
    from avg.artifacts.runfiles import RunRecord, write_run
    from avg.models.clip import load_clip

    encoder = load_clip("open_clip", model_name, str(checkpoint), device="cpu", normalize=True)
    records = load_karpathy(json_path, image_root).split(split)
    pixels = preload_images([r.path for r in records], encoder.image_transform(), progress=progress)
    image_feats = torch.cat([encoder.encode_images(pixels[s:s + batch_size].float()) for s in range(0, len(pixels), batch_size)])
    queries = [(text, i) for i, r in enumerate(records) for text in r.captions]
    text_feats = encoder.encode_texts([q for q, _ in queries], batch_size=batch_size)
    top_idx, top_scores = exact_search(text_feats.numpy(), image_feats.numpy(), k=100, device="cpu")
    run = [RunRecord(qid=qi, query=q, gold=records[i].image_id, ranked=[records[j].image_id for j in top_idx[qi]], scores=[round(float(s), 6) for s in top_scores[qi]]) for qi, (q, i) in enumerate(queries)]
    write_run(run, Path(out_dir) / f"run_{split}.jsonl")
    metrics = retrieval_metrics(run, gallery_size=len(records))
    return {**metrics, "split": split, "chance_R@1": 100.0 / len(records)}


def train_demo_clip(json_path: os.PathLike, image_root: os.PathLike, out_dir: os.PathLike, cfg: DemoClipConfig = DemoClipConfig(), progress: bool = True) -> dict:
    """Train on the TRAIN split, save ``<out_dir>/avg_demo_clip.pt``, evaluate on TEST, write metrics.json.

    Returns the metrics dict (also in ``<out_dir>/metrics.json``).
    """
    import open_clip

    from avg.data.karpathy import load_karpathy
    from avg.models.clip import register_clip_configs
    from avg.core.io import write_json
    from avg.core.seed import set_seed
    from avg.core.tracking import RunLogger

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    set_seed(cfg.seed)
    register_clip_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=None)
    tokenizer = open_clip.get_tokenizer(cfg.model)
    train = load_karpathy(json_path, image_root).split("train")
    if not train:
        raise ValueError(f"{json_path}: no train images")
    logger = RunLogger(out_dir, project="avg", run_name="demo_clip", config={**asdict(cfg), "annotations": str(json_path)})
    t_start = time.time()
    try:
        logger.info("demo CLIP %s: %d train images, %d captions, %.2fM parameters", cfg.model, len(train), sum(len(r.captions) for r in train), sum(p.numel() for p in model.parameters()) / 1e6)
        pixels = preload_images([r.path for r in train], preprocess, progress=progress)
        texts = [c for r in train for c in r.captions]
        caption_image = torch.tensor([i for i, r in enumerate(train) for _ in r.captions])
        tokens = tokenizer(texts)
        stats = train_clip(model, pixels, tokens, caption_image, cfg, logger=logger, progress=progress)
        ckpt = save_open_clip_checkpoint(model, out_dir / CHECKPOINT_NAME, extra={"model": cfg.model, "train": {**asdict(cfg), **stats}})
        metrics = zero_shot_test(ckpt, json_path, image_root, out_dir, model_name=cfg.model, progress=progress)
        metrics.update({"checkpoint": CHECKPOINT_NAME, "model": cfg.model, "annotations": str(json_path), "train": stats, "config": asdict(cfg), "total_seconds": round(time.time() - t_start, 1)})
        logger.log({f"eval/test/{k}": v for k, v in metrics.items() if k.startswith("R@") or k == "mean_rank"})
        logger.summary({f"eval/test/{k}": v for k, v in metrics.items() if k.startswith("R@")})
        logger.info("demo CLIP test (%d queries, %d images): R@1=%.2f R@5=%.2f R@10=%.2f (chance R@1=%.2f) in %.0fs of training",
                    metrics["num_queries"], metrics["gallery_size"], metrics["R@1"], metrics["R@5"], metrics["R@10"], metrics["chance_R@1"], stats["train_seconds"])
        write_json(metrics, out_dir / "metrics.json")
    finally:
        logger.finish()
    return metrics
