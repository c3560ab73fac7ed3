"""Map every image's vokens onto SEED-LLaMA image tokens (``<img_00000>`` ...), optionally with a
richer residual k-means code of the same CLIP image features (avg.reranker.image_tokens).

    python -m avg.stages.convert_voken_to_seed --codes-dir outputs/demo/generate_codes \\
        --out-dir outputs/demo/convert_voken_to_seed [--emb-dir outputs/demo/prepare_emb --rich-levels 4]

Writes ``image_tokens.json`` (the mapping + image id -> token indices), ``token_vectors.npy``
(vectors that seed the embeddings of tokens added to a non-SEED model) and ``stage.json``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from avg.artifacts.registry import manifest_name
from avg.reranker.image_tokens import SEED_NUM_IMAGE_TOKENS, TOKENS_FILE, build_image_tokens, image_token
from avg.retriever.data import read_codes
from avg.core.cli import run_main
from avg.core.stages import add_force_arg, begin_stage, skip_if_done
from avg.core.tracking import get_logger

STAGE = manifest_name("convert_voken_to_seed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codes-dir", required=True, help="generate_codes/ folder (codes.json, codebook.npy)")
    p.add_argument("--out-dir", required=True, help="output folder (convert_voken_to_seed/)")
    p.add_argument("--capacity", type=int, default=SEED_NUM_IMAGE_TOKENS,
                   help="image tokens the reranker's LM holds or may add (SEED-LLaMA: 8192); the map must fit")
    p.add_argument("--emb-dir", default=None, help="prepare_emb/ folder with the CLIP image features (needed for --rich-levels)")
    p.add_argument("--rich-levels", type=int, default=0,
                   help="append this many residual k-means tokens of the CLIP image feature to each image (0: vokens only)")
    p.add_argument("--rich-size", type=int, default=256, help="entries per residual k-means level")
    p.add_argument("--kmeans-iters", type=int, default=20, help="Lloyd iterations per residual level")
    p.add_argument("--seed", type=int, default=42, help="seed of the k-means initialisation")
    add_force_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    log = get_logger("avg.reranker.tokens")
    if args.rich_levels and not args.emb_dir:
        from avg.core.io import InputError
        raise InputError("--rich-levels needs --emb-dir (the CLIP image features)")
    codes = read_codes(args.codes_dir)
    run = begin_stage(args.out_dir, STAGE, vars(args), inputs=[args.codes_dir, args.emb_dir], force=args.force)
    if run.up_to_date and skip_if_done():
        log.info("%s: up to date, skipping", args.out_dir)
        return run.previous.get("summary") or {}
    feats = ids = None
    fit_ids: list = []
    if args.rich_levels:
        from avg.artifacts.emb import load_emb
        emb = load_emb(args.emb_dir)
        feats = np.asarray(emb.image_features, dtype=np.float32)
        ids = [str(im["image_id"]) for im in emb.images]
        fit_ids = [str(im["image_id"]) for im in emb.images if im["split"] == "train"]
    tokens = build_image_tokens(codes, rich_features=feats, rich_image_ids=ids, rich_fit_ids=fit_ids,
                                rich_levels=args.rich_levels, rich_size=args.rich_size, capacity=args.capacity,
                                seed=args.seed, iters=args.kmeans_iters)
    m = tokens.mapping
    distinct = len({tuple(s) for s in tokens.images.values()})
    summary = {"images": len(tokens.images), "tokens_per_image": m.length, "image_tokens_used": m.num_tokens,
               "capacity": args.capacity, "distinct_sequences": distinct,
               "last_token": image_token(m.num_tokens - 1)}
    tokens.save(args.out_dir, extra={"summary": summary})
    log.info("%s: %d images -> %d image tokens each (%d of %d <img_*> tokens used, %d distinct sequences) -> %s",
             args.codes_dir, len(tokens.images), m.length, m.num_tokens, args.capacity, distinct,
             Path(args.out_dir) / TOKENS_FILE)
    run.complete(summary=summary)
    return summary


if __name__ == "__main__":
    run_main(main)
