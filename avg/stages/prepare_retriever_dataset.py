"""Build the retriever's data: caption queries paired with their image's voken code.

    python -m avg.stages.prepare_retriever_dataset --annotations dataset.json --image-root images \\
        --codes-dir outputs/demo/generate_codes --out-dir outputs/demo/prepare_retriever_dataset

Writes ``{train,val,test}.jsonl`` ({"query", "image_id", "code"}, one line per caption, plus
``text_row``, the caption's row in ``prepare_emb/text_features.npy``, when ``--emb-dir`` is given: the
query-feature prefix of avg.retriever.prefix reads it),
``gallery_{split}.json`` ({image_id: code}) and ``meta.json``. Test (and val) captions only ever
go to their own split's file. Pseudo queries (``--pseudo-queries``) are extra *training* queries;
when they target val/test gallery images the data is transductive: a loud warning is logged and
``meta.json`` says so.

The out dir's ``stage.json`` (avg.core.stages) refuses to overwrite data of another configuration
without ``--force``; new codes upstream make it stale.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from avg.artifacts.registry import manifest_name
from avg.data.karpathy import load_karpathy
from avg.retriever.data import SPLITS, CodesData, read_codes
from avg.artifacts.emb import load_emb
from avg.core.io import InputError, atomic_dir, read_jsonl, write_json, write_jsonl
from avg.core.tracking import get_logger
from avg.core.cli import run_main
from avg.core.stages import add_force_arg, begin_stage, skip_if_done

log = get_logger("avg.stages.prepare_retriever_dataset")


def load_pseudo_queries(path: str | Path) -> list[dict]:
    """Read a pseudo-query jsonl, checking every line ({"query", "image_id", ...})."""
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("query"), str) or not row["query"].strip():
            raise InputError(f"{path}: line {lineno}: 'query' must be a non-empty string")
        if not isinstance(row.get("image_id"), str) or not row["image_id"]:
            raise InputError(f"{path}: line {lineno}: 'image_id' must be a non-empty string")
    return rows


def build_retriever_data(images, codes: CodesData, pseudo: Sequence[tuple[str, list[dict]]] = (), *,
                         max_train_queries: Optional[int] = None, seed: int = 0,
                         source: str = "annotations", text_rows: Optional[dict] = None) -> dict:
    """Pure core: Karpathy ImageRecords + codes (+ pseudo queries) -> split files and meta.

    ``text_rows`` ((image_id, caption) -> feature row) adds each
    caption's ``text_row`` (``Embeddings.caption_row_map`` of avg.artifacts.emb); a caption missing
    from it is an error (prepare_emb/ from other annotations).
    Pseudo queries get ``text_row`` null (no feature was computed for them).
    Returns {"queries": {split: [rows]}, "galleries": {split: {image_id: code}}, "meta": {...}}.
    """
    queries = {s: [] for s in SPLITS}
    galleries = {s: {} for s in SPLITS}
    missing = Counter()
    split_of, captions_of = {}, {}
    for im in images:
        split_of[im.image_id] = im.split
        captions_of[im.image_id] = set(im.captions)
        rec = codes.images.get(im.image_id)
        if rec is None:
            missing[im.split] += 1
            continue
        if rec["split"] != im.split:
            raise InputError(f"codes.json: image {im.image_id!r} is in split {rec['split']!r} but "
                             f"{source} puts it in {im.split!r}; regenerate the codes for this dataset")
        galleries[im.split][im.image_id] = rec["code"]
        for cap in im.captions:
            row = {"query": cap, "image_id": im.image_id, "code": rec["code"]}
            if text_rows is not None:
                if (im.image_id, cap) not in text_rows:
                    raise InputError(f"{source}: image {im.image_id!r}: caption {cap!r} has no feature in prepare_emb/ "
                                     "(was prepare_emb/ built from other annotations?)")
                row["text_row"] = text_rows[(im.image_id, cap)]
            queries[im.split].append(row)
    extra_codes = sum(1 for i in codes.images if i not in split_of)

    transductive = Counter()
    pseudo_used, leaked, no_code = Counter(), 0, 0
    for name, rows in pseudo:
        for lineno, row in enumerate(rows, 1):
            image_id = row["image_id"]
            if image_id not in split_of:
                raise InputError(f"{name}: line {lineno}: image {image_id!r} is not in {source}")
            rec = codes.images.get(image_id)
            if rec is None:
                no_code += 1
                continue
            split = split_of[image_id]
            if split != "train" and row["query"] in captions_of[image_id]:
                leaked += 1  # a held-out image's own caption: never train on it
                continue
            if split != "train":
                transductive[split] += 1
            extra = {"text_row": None} if text_rows is not None else {}
            queries["train"].append({"query": row["query"], "image_id": image_id, "code": rec["code"], **extra})
            pseudo_used[name] += 1

    n_train_all = len(queries["train"])
    if max_train_queries is not None and n_train_all > max_train_queries:
        keep = np.sort(np.random.default_rng(seed).choice(n_train_all, size=max_train_queries, replace=False))
        queries["train"] = [queries["train"][i] for i in keep]

    def collisions(gallery: dict) -> int:
        counts = Counter(tuple(c) for c in gallery.values())
        return sum(n for n in counts.values() if n > 1)

    meta = {
        "counts": {s: {"queries": len(queries[s]), "images": len(galleries[s]),
                       "colliding_images": collisions(galleries[s])} for s in SPLITS},
        "train_queries_before_cap": n_train_all,
        "images_without_code": dict(missing),
        "codes_without_image": extra_codes,
        "pseudo_queries": {"used": dict(pseudo_used), "dropped_no_code": no_code,
                           "dropped_own_caption_of_heldout_image": leaked,
                           "on_heldout_images": dict(transductive)},
        "transductive": bool(sum(transductive.values())),
        "text_rows": text_rows is not None,
        "code_len": int(codes.meta.get("code_len", codes.meta["num_levels"])),
        "codes_meta": {k: codes.meta[k] for k in ("num_levels", "codebook_size", "shared_codebook", "code_len",
                                                  "disambiguation", "disambiguation_size", "tie_rule")
                       if k in codes.meta},
    }
    return {"queries": queries, "galleries": galleries, "meta": meta}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True, help="Karpathy-format caption json")
    p.add_argument("--image-root", default=".", help="folder the json's image paths are relative to (not read)")
    p.add_argument("--codes-dir", required=True, help="generate_codes/ folder written by avg.stages.generate_codes")
    p.add_argument("--emb-dir", default=None, help="prepare_emb/ folder: record each caption's text-feature row (for --query-prefix)")
    p.add_argument("--out-dir", required=True, help="output folder (replaced atomically)")
    p.add_argument("--pseudo-queries", nargs="*", default=[], help="pseudo-query jsonl files (extra training queries)")
    p.add_argument("--max-train-queries", type=int, default=None, help="keep a seeded random subset of this many training queries")
    p.add_argument("--seed", type=int, default=0, help="seed for --max-train-queries subsampling")
    add_force_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    dataset = load_karpathy(args.annotations, args.image_root, check_files=False)
    codes = read_codes(args.codes_dir, with_codebook=False)
    pseudo = [(str(p), load_pseudo_queries(p)) for p in args.pseudo_queries]
    text_rows = load_emb(args.emb_dir).caption_row_map() if args.emb_dir else None
    # the out dir is swapped in whole at the end, so the manifest is written only by complete()
    run = begin_stage(args.out_dir, manifest_name("prepare_retriever_dataset"), vars(args), force=args.force, ignore=("image_root",),
                      inputs=[args.annotations, args.codes_dir, args.emb_dir, *args.pseudo_queries], mark_running=False)
    if run.up_to_date and skip_if_done():
        log.info("prepare_retriever_dataset: outputs in %s are complete and up to date; skipping", args.out_dir)
        return run.previous.get("summary") or {}
    out = build_retriever_data(dataset.images, codes, pseudo, max_train_queries=args.max_train_queries,
                               seed=args.seed, source=str(args.annotations), text_rows=text_rows)
    meta = out["meta"]
    meta["sources"] = {"annotations": str(args.annotations), "codes_dir": str(args.codes_dir),
                       "emb_dir": str(args.emb_dir) if args.emb_dir else None,
                       "pseudo_queries": [str(p) for p in args.pseudo_queries]}
    if sum(meta["images_without_code"].values()):
        log.warning("%d image(s) have no code in %s and were skipped (per split: %s)",
                    sum(meta["images_without_code"].values()), args.codes_dir, meta["images_without_code"])
    if meta["transductive"]:
        log.warning("!!! TRANSDUCTIVE: %s pseudo queries target val/test gallery images (per split: %s). "
                    "Results on this data are NOT comparable to the standard protocol. !!!",
                    sum(meta["pseudo_queries"]["on_heldout_images"].values()), meta["pseudo_queries"]["on_heldout_images"])
    with atomic_dir(args.out_dir) as tmp:
        for s in SPLITS:
            write_jsonl(out["queries"][s], tmp / f"{s}.jsonl")
            write_json(out["galleries"][s], tmp / f"gallery_{s}.json", indent=None)
        write_json(meta, tmp / "meta.json")
    run.complete({f"{s}_queries": meta["counts"][s]["queries"] for s in SPLITS})  # after the dir swap
    log.info("wrote %s: %s", args.out_dir, {s: meta["counts"][s] for s in SPLITS})
    return meta


if __name__ == "__main__":
    run_main(main)
