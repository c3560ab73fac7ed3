"""Stage 1: encode every image and caption of a Karpathy-format dataset with a frozen CLIP.

Writes the ``prepare_emb/`` artifact (``avg.artifacts.emb``): float16 image and caption feature arrays
plus an index that maps caption rows to image rows and records the encoder. The RQ-VAE, the CLIP
baseline and the pseudo-query tool all read it.

    python -m avg.stages.prepare_emb --annotations data/flickr30k/dataset_flickr30k.json \\
        --image-root data/flickr30k/images --out-dir out/flickr30k/emb \\
        --backend open_clip --clip-model ViT-L-14-336 --pretrained openai

An unreadable image stops the run with an error naming the file (nothing is written), unless
``--skip-bad-images``: then the image and its captions are left out and listed in
``index["skipped_images"]``.

The out dir gets a ``stage.json`` manifest (avg.core.stages): a finished ``prepare_emb/`` of another
configuration is never overwritten without ``--force``; with ``AVG_SKIP_DONE=1`` an up-to-date one
is kept as it is.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from avg.artifacts.registry import manifest_name
from avg.core.progress import tqdm

from avg.core.io import InputError
from avg.core.tracking import get_logger
from avg.core.cli import run_main
from avg.core.stages import add_force_arg, begin_stage, skip_if_done

log = get_logger("avg.prepare_emb")


class _ImageFiles(Dataset):
    """(index, pixels or None, error or None) per image; errors travel back instead of raising,
    so the main process decides whether to stop or skip."""

    def __init__(self, paths: Sequence[Path], transform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from avg.data.images import load_rgb

        try:
            return i, self.transform(load_rgb(self.paths[i])), None
        except InputError as e:
            return i, None, str(e)


def _collate(batch):
    idx = [b[0] for b in batch]
    ok = [b for b in batch if b[1] is not None]
    pixels = torch.stack([b[1] for b in ok]) if ok else None
    return idx, [b[0] for b in ok], pixels, [(b[0], b[2]) for b in batch if b[2] is not None]


@dataclass
class EmbResult:
    image_features: np.ndarray
    text_features: np.ndarray
    images: list
    captions: list
    skipped: list = field(default_factory=list)
    truncated_captions: int = 0  # longer than the text encoder's context: cut by its tokenizer
    image_grid: Optional[np.ndarray] = None  # [n_images, g * g, width] with grid=g


def encode_dataset(dataset, encoder, *, batch_size: int = 64, num_workers: int = 2, skip_bad_images: bool = False, text_batch_size: int = 256, progress: bool = True, grid: int = 0) -> EmbResult:
    """Encode all images (every split) and then the captions of the images that loaded; with
    ``grid`` > 0 also each image's patch tokens pooled to a grid x grid layout.

    `dataset` is an ``avg.data.karpathy.CaptionDataset``; `encoder` a ``ClipEncoder``.
    Raises InputError on the first unreadable image unless `skip_bad_images`.
    """
    records = list(dataset.images)
    loader = DataLoader(
        _ImageFiles([r.path for r in records], encoder.image_transform()),
        batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
        persistent_workers=False, pin_memory=encoder.device.type == "cuda",
    )
    feats: list[Optional[np.ndarray]] = [None] * len(records)
    grids: list[Optional[np.ndarray]] = [None] * len(records)
    skipped = []
    bar = tqdm(total=len(records), desc="images", unit="img", disable=not progress)
    for idx, ok_idx, pixels, errors in loader:
        for i, err in errors:
            if not skip_bad_images:
                raise InputError(f"{err} (record images[{i}] of {dataset.source}; pass --skip-bad-images to leave such images out)")
            skipped.append({"image_id": records[i].image_id, "file": records[i].rel_path, "split": records[i].split, "error": err})
        if pixels is not None:
            if grid:
                out, cells = encoder.encode_images_and_grid(pixels, grid)
                cells = cells.numpy().astype(np.float16)
                for row, i in enumerate(ok_idx):
                    grids[i] = cells[row]
            else:
                out = encoder.encode_images(pixels)
            out = out.numpy()
            for row, i in enumerate(ok_idx):
                feats[i] = out[row]
        bar.update(len(idx))
    bar.close()
    if skipped:
        log.warning("skipped %d unreadable image(s) and their captions: %s", len(skipped), ", ".join(s["file"] for s in skipped[:20]) + (" ..." if len(skipped) > 20 else ""))

    kept = [i for i in range(len(records)) if feats[i] is not None]
    if not kept:
        raise InputError(f"{dataset.source}: no image could be read (all {len(records)} skipped)")
    images, captions, texts = [], [], []
    for row, i in enumerate(kept):
        rec = records[i]
        images.append({"image_id": rec.image_id, "file": rec.rel_path, "split": rec.split})
        for text in rec.captions:
            captions.append({"text": text, "image_row": row, "split": rec.split})
            texts.append(text)
    image_features = np.stack([feats[i] for i in kept])
    text_chunks = []
    truncated_before = encoder.truncated_captions
    for start in tqdm(range(0, len(texts), text_batch_size), desc="captions", unit="batch", disable=not progress):
        text_chunks.append(encoder.encode_texts(texts[start:start + text_batch_size], batch_size=text_batch_size).numpy())
    text_features = np.concatenate(text_chunks)
    truncated = encoder.truncated_captions - truncated_before
    if truncated:
        log.warning("%d caption(s) longer than the text encoder's context were truncated by its tokenizer "
                    "(only their first tokens are encoded; counted in index.json 'truncated_captions')", truncated)
    image_grid = np.stack([grids[i] for i in kept]) if grid else None
    return EmbResult(image_features, text_features, images, captions, skipped, truncated, image_grid)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avg.stages.prepare_emb", description="Encode every image and caption of a Karpathy-format dataset with a frozen CLIP into a prepare_emb/ directory.")
    p.add_argument("--annotations", required=True, help="Karpathy-format json (images[].filename, split, sentences[].raw)")
    p.add_argument("--image-root", required=True, help="folder the json's filepath/filename are relative to")
    p.add_argument("--out-dir", required=True, help="the prepare_emb/ directory to write (replaced atomically)")
    p.add_argument("--backend", choices=("open_clip", "hf"), default="open_clip", help="open_clip (create_model_and_transforms) or hf (transformers CLIPModel)")
    p.add_argument("--clip-model", default="ViT-L-14-336", help="open_clip architecture name (e.g. ViT-L-14-336, avg-demo-vit) or HF model id / local dir (e.g. openai/clip-vit-large-patch14-336)")
    p.add_argument("--pretrained", default=None, help="open_clip: pretrained tag (e.g. openai) or checkpoint file; ignored by the hf backend (default: openai for open_clip)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--text-batch-size", type=int, default=256, help="captions per forward pass")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader worker processes decoding images (default: the CPU cores, at most 8)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16"), default="auto", help="auto = fp16 autocast on CUDA, fp32 on the CPU")
    p.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images (and their captions) out instead of stopping")
    p.add_argument("--no-normalize", action="store_true", help="store raw projections instead of L2-normalised features")
    p.add_argument("--image-grid", type=int, default=0,
                   help="also store each image's ViT patch tokens pooled to a G x G grid (image_grid.npy, fp16; "
                        "what the LM reranker's --grid-head reads; 0: off)")
    p.add_argument("--max-images", type=int, default=None, help="encode only the first N images of the json (quick runs)")
    p.add_argument("--seed", type=int, default=0, help="seed (the encoder is frozen; this only pins any randomness in loading)")
    p.add_argument("--no-progress", action="store_true", help="hide tqdm bars")
    add_force_arg(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> Path:
    from avg.data.karpathy import load_karpathy
    from avg.models.clip import load_clip
    from avg.artifacts.emb import save_emb
    from avg.core.seed import set_seed

    args = build_parser().parse_args(argv)
    set_seed(args.seed)
    pretrained = args.pretrained
    if args.backend == "open_clip" and pretrained is None:
        pretrained = "openai"
    # missing files are reported per image by load_rgb when skipping, all at once otherwise
    dataset = load_karpathy(args.annotations, args.image_root, check_files=not args.skip_bad_images)
    if args.max_images is not None:
        dataset.images = dataset.images[: args.max_images]
    counts = {s: sum(im.split == s for im in dataset.images) for s in ("train", "val", "test")}
    log.info("dataset %s: %d images (%s)", args.annotations, len(dataset.images), ", ".join(f"{k} {v}" for k, v in counts.items()))
    weights = [w for w in (pretrained, args.clip_model) if w and Path(w).exists()]  # local checkpoints are inputs
    if args.backend == "hf" and not Path(args.clip_model).exists():
        weights.append(args.clip_model)  # a hub id: fingerprinted by the commit of its cached copy
    # prepare_emb/ is swapped in whole at the end (save_emb), so a killed or failed run leaves the old dir as it
    # was and nothing is claimed before then: the manifest is written only by complete()
    if args.num_workers is None:
        args.num_workers = min(8, os.cpu_count() or 1)
    run = begin_stage(args.out_dir, manifest_name("prepare_emb"), vars(args), inputs=[args.annotations, args.image_root, *weights],
                      force=args.force, mark_running=False, ignore=("num_workers",))  # speed only
    if run.up_to_date and skip_if_done():
        log.info("prepare_emb: outputs in %s are complete and up to date; skipping", args.out_dir)
        return Path(args.out_dir)

    encoder = load_clip(args.backend, args.clip_model, pretrained, device=args.device, precision=args.precision, normalize=not args.no_normalize)
    log.info("encoder %s %s (pretrained=%s) on %s, %s", args.backend, args.clip_model, pretrained, encoder.device, encoder.precision)
    res = encode_dataset(dataset, encoder, batch_size=args.batch_size, num_workers=args.num_workers, skip_bad_images=args.skip_bad_images, text_batch_size=args.text_batch_size, progress=not args.no_progress, grid=args.image_grid)
    out = save_emb(
        args.out_dir,
        res.image_features.astype(np.float16),
        res.text_features.astype(np.float16),
        res.images,
        res.captions,
        encoder=encoder.describe(),
        image_grid=res.image_grid,
        extra={"skipped_images": res.skipped, "truncated_captions": res.truncated_captions, "source": {"annotations": str(args.annotations), "image_root": str(args.image_root), "max_images": args.max_images}},
    )
    run.complete({"num_images": len(res.images), "num_captions": len(res.captions),
                  "dim": int(res.image_features.shape[1]), "skipped_images": len(res.skipped)})  # after the dir swap
    log.info("wrote %s: %d images x %d captions, dim %d%s", out, len(res.images), len(res.captions), res.image_features.shape[1], f", {len(res.skipped)} skipped" if res.skipped else "")
    return out


if __name__ == "__main__":
    run_main(main)
