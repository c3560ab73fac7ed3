#!/usr/bin/env python
"""Generate the synthetic demo dataset (rendered shape scenes + captions, Karpathy json).

Skips the work when --out already holds a dataset made with the same parameters
(recorded in <out>/demo_params.json); --force rebuilds it.

Example:
    python tools/make_demo_data.py --out data/demo
"""
from __future__ import annotations

import argparse
import sys
import time

from avg.data.demo import ensure_demo_dataset
from avg.data.karpathy import load_karpathy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/demo",
                   help="output folder: dataset_demo.json, images/<split>/, demo_params.json (default: data/demo)")
    p.add_argument("--n-train", type=int, default=10000, help="number of training images (default: 10000)")
    p.add_argument("--n-val", type=int, default=1000, help="number of validation images (default: 1000)")
    p.add_argument("--n-test", type=int, default=1000, help="number of test images (default: 1000)")
    p.add_argument("--image-size", type=int, default=64, help="side of the square images in pixels (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed gives byte-identical output")
    p.add_argument("--num-workers", type=int, default=None,
                   help="rendering processes (default: number of CPU cores, at most 8); does not change output")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical dataset exists")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        json_path, built = ensure_demo_dataset(
            args.out, force=args.force, num_workers=args.num_workers, n_train=args.n_train,
            n_val=args.n_val, n_test=args.n_test, image_size=args.image_size, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = load_karpathy(json_path, json_path.parent / "images", check_files=False).counts()
    for split in ("train", "val", "test", "total"):
        print(f"{split:>5}: {counts[split]['images']:>7} images {counts[split]['captions']:>8} captions")
    took = time.perf_counter() - start
    print(f"{'generated' if built else 'up to date, kept'} {json_path} ({took:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
