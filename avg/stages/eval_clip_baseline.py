"""The CLIP two-tower baseline: exact text->image search over the same ``prepare_emb/`` features.

Every caption of a split queries the images of that split by inner product (cosine similarity
when the features are L2-normalised, as ``prepare_emb/index.json`` records). The result is a run file
scored by ``avg.metrics.retrieval_metrics``, exactly like the generative retriever, so the
two are compared under one protocol.

    python -m avg.stages.eval_clip_baseline --emb-dir out/demo/emb --split test --out-dir out/demo/eval

The out dir's ``stage.json`` (avg.core.stages) records the configuration, split included: another
configuration or split needs its own ``--out-dir`` (or ``--force``).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from avg.artifacts.registry import manifest_name
from avg.metrics import DEFAULT_KS, format_metrics, retrieval_metrics
from avg.artifacts.runfiles import RunRecord, write_run
from avg.search.exact import exact_search
from avg.core.io import InputError, write_json
from avg.core.cli import run_main
from avg.core.stages import add_force_arg, begin_stage, skip_if_done
from avg.core.tracking import get_logger


def search_split(emb, split: str, k: int = 100, batch_size: int = 1024, device: str = "auto", progress: bool = True) -> tuple[list[RunRecord], int]:
    """Run records for every caption of `split` against the images of `split` (an Embeddings)."""
    img_rows = emb.image_rows(split)
    cap_rows = emb.caption_rows(split)
    if len(img_rows) == 0:
        raise InputError(f"prepare_emb/: no images in split {split!r}")
    if len(cap_rows) == 0:
        raise InputError(f"prepare_emb/: no captions in split {split!r}")
    image_feats = np.asarray(emb.image_features[img_rows], dtype=np.float32)
    text_feats = np.asarray(emb.text_features[cap_rows], dtype=np.float32)
    if not emb.normalized:  # cosine similarity is CLIP's score; normalise if the writer did not
        image_feats = F.normalize(torch.from_numpy(image_feats), dim=-1).numpy()
        text_feats = F.normalize(torch.from_numpy(text_feats), dim=-1).numpy()
    top_idx, top_scores = exact_search(text_feats, image_feats, k=k, batch_size=batch_size, device=device, progress=progress)
    gallery_ids = [emb.images[r]["image_id"] for r in img_rows]
    records = []
    for qi, row in enumerate(cap_rows):
        cap = emb.captions[row]
        records.append(RunRecord(
            qid=int(row),
            query=cap["text"],
            gold=emb.images[cap["image_row"]]["image_id"],
            ranked=[gallery_ids[j] for j in top_idx[qi]],
            scores=[round(float(s), 6) for s in top_scores[qi]],
        ))
    return records, len(img_rows)


def evaluate_clip_baseline(emb_dir: str | os.PathLike, split: str, out_dir: str | os.PathLike, *, k: int = 100, batch_size: int = 1024, device: str = "auto", ks: Sequence[int] = DEFAULT_KS, progress: bool = True) -> dict:
    """Write ``run_clip_<split>.jsonl`` and ``metrics_clip_<split>.json`` under `out_dir`; return the metrics."""
    from avg.artifacts.emb import load_emb

    emb = load_emb(emb_dir)
    import time

    t0 = time.perf_counter()
    records, gallery_size = search_split(emb, split, k=k, batch_size=batch_size, device=device, progress=progress)
    seconds = time.perf_counter() - t0
    metrics = retrieval_metrics(records, ks=ks, gallery_size=gallery_size)
    metrics.update({"system": "clip_two_tower", "split": split, "emb_dir": str(emb_dir), "encoder": emb.index["encoder"], "run_depth": min(k, gallery_size)})
    # timed: search over precomputed text features (no text encoding; avg.experiments.efficiency times both towers)
    metrics.update({"eval_seconds": seconds, "queries_per_s": len(records) / max(seconds, 1e-9), "queries_per_s_excludes_text_encoding": True})
    out_dir = Path(out_dir)
    write_run(records, out_dir / f"run_clip_{split}.jsonl")
    write_json(metrics, out_dir / f"metrics_clip_{split}.json")
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avg.stages.eval_clip_baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--emb-dir", required=True, help="the prepare_emb/ directory written by avg.stages.prepare_emb")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="queries = captions of this split, gallery = its images")
    p.add_argument("--out-dir", required=True, help="where run_clip_<split>.jsonl and metrics_clip_<split>.json go")
    p.add_argument("--top-k", type=int, default=100, help="length of each ranked list in the run file")
    p.add_argument("--batch-size", type=int, default=1024, help="queries per matmul")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    add_force_arg(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from avg.core.tracking import RunLogger

    args = build_parser().parse_args(argv)
    from avg.artifacts.emb import load_emb
    load_emb(args.emb_dir)  # a wrong --emb-dir fails before anything is written
    run = begin_stage(args.out_dir, manifest_name("eval_clip_baseline"), vars(args), inputs=[args.emb_dir], force=args.force)
    if run.up_to_date and skip_if_done():
        get_logger("avg.clip_baseline").info("eval_clip_baseline: outputs in %s are complete and up to date; skipping", args.out_dir)
        return run.previous.get("summary") or {}
    logger = RunLogger(args.out_dir, run_name=f"clip_baseline_{args.split}", config=None, log_name=f"clip_baseline_{args.split}.log", metrics_name=f"clip_baseline_{args.split}.metrics.jsonl", use_wandb=False)
    try:
        metrics = evaluate_clip_baseline(args.emb_dir, args.split, args.out_dir, k=args.top_k, batch_size=args.batch_size, device=args.device)
        logger.log({f"eval/{args.split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        logger.info("CLIP two-tower %s: %s", args.split, format_metrics(metrics))
        run.complete({k: metrics[k] for k in ("R@1", "R@5", "R@10", "mean_rank") if k in metrics})
    finally:
        logger.finish()
    return metrics


if __name__ == "__main__":
    run_main(main)
