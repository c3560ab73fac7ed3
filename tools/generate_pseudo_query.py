"""Generate pseudo queries for the images of one split by caption transfer (offline).

Each image receives the captions of its nearest training images (CLIP image features from
prepare_emb). Output: jsonl of {query, image_id, source_image_id, split, transductive}, the format
`python -m avg.stages.prepare_retriever_dataset --pseudo-queries` reads.

Using it on the val/test split is TRANSDUCTIVE (it looks at the evaluation images, though never at
their captions); results obtained with it must be reported as such.

    python tools/generate_pseudo_query.py --emb-dir outputs/demo/prepare_emb --split test \
        --out outputs/demo/pseudo_queries/test.jsonl
"""
from __future__ import annotations

import argparse
import sys

from avg.artifacts.emb import load_emb
from avg.data.pseudo_queries import caption_transfer
from avg.core.io import InputError, write_jsonl
from avg.core.tracking import get_logger


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--emb-dir", required=True, help="prepare_emb/ directory written by prepare_emb")
    p.add_argument("--split", required=True, choices=["train", "val", "test"], help="images that receive pseudo queries")
    p.add_argument("--out", required=True, help="output jsonl path")
    p.add_argument("--neighbors", type=int, default=3, help="nearest training images whose captions are transferred")
    p.add_argument("--per-image", type=int, default=5, help="pseudo queries per image (distinct captions)")
    p.add_argument("--batch-size", type=int, default=1024, help="query batch for the similarity search")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda:1, ...")
    args = p.parse_args(argv)
    log = get_logger("avg.pseudo_queries")
    try:
        emb = load_emb(args.emb_dir)
        records = caption_transfer(emb, args.split, neighbors=args.neighbors, per_image=args.per_image, batch_size=args.batch_size, device=args.device)
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = write_jsonl(records, args.out)
    if args.split != "train":
        log.warning("TRANSDUCTIVE: pseudo queries for the %s gallery use its images' features; label results accordingly", args.split)
    log.info("wrote %d pseudo queries for %d %s images to %s", n, len(emb.image_rows(args.split)), args.split, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
