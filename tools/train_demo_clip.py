"""Train the small demo CLIP (avg-demo-vit) on a demo dataset and report its zero-shot test recall.

    python tools/train_demo_clip.py --annotations data/demo/dataset_demo.json \
        --image-root data/demo/images --out-dir data/demo/clip

Writes <out-dir>/avg_demo_clip.pt (an open_clip checkpoint: pass it as --pretrained with
--clip-model avg-demo-vit), <out-dir>/metrics.json, run_test.jsonl and the training log.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a fresh clone without install

from avg.models.demo_clip import DemoClipConfig, train_demo_clip  # noqa: E402
from avg.core.cli import run_main  # noqa: E402


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = DemoClipConfig()
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the train images (one random caption per image per pass)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="image-caption pairs per contrastive batch")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (warmup then cosine decay)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on weight matrices")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (timing runs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, batch order and caption sampling")


def config_from_args(args: argparse.Namespace) -> DemoClipConfig:
    return DemoClipConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, max_steps=args.max_steps, threads=args.threads, seed=args.seed)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--annotations", required=True, help="Karpathy-format json of the demo dataset")
    p.add_argument("--image-root", required=True, help="folder the json's filepath/filename are relative to")
    p.add_argument("--out-dir", required=True, help="where the checkpoint, metrics.json and logs go")
    p.add_argument("--no-progress", action="store_true", help="hide tqdm bars")
    add_train_args(p)
    args = p.parse_args(argv)
    return train_demo_clip(args.annotations, args.image_root, args.out_dir, config_from_args(args), progress=not args.no_progress)


if __name__ == "__main__":
    run_main(main)
