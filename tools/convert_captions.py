#!/usr/bin/env python
"""Convert a caption table (CSV or JSONL with image,caption,split; one row per caption) to Karpathy json.

Example:
    python tools/convert_captions.py --input captions.csv --output data/mine/dataset_mine.json \
        --image-root data/mine/images
"""
from __future__ import annotations

import argparse
import sys

from avg.data.convert import convert_captions
from avg.core.io import InputError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="caption table: .csv with a header row, or .jsonl with one object per line; "
                        "columns/keys image (path relative to the image root), caption, split "
                        "(train/val/test/restval)")
    p.add_argument("--output", required=True, help="Karpathy-format json to write (atomically)")
    p.add_argument("--image-root", default=None,
                   help="if given, check that every image exists under this folder")
    p.add_argument("--dataset-name", default=None,
                   help="value of the json's top-level 'dataset' field (default: input file stem)")
    args = p.parse_args(argv)
    try:
        counts = convert_captions(args.input, args.output, image_root=args.image_root,
                                  dataset_name=args.dataset_name)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split in ("train", "val", "test", "total"):
        print(f"{split:>5}: {counts[split]['images']:>7} images {counts[split]['captions']:>8} captions")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
