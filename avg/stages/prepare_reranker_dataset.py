"""Reranker data: the retriever's top-k candidates (with scores) for training and evaluation queries.

    python -m avg.stages.prepare_reranker_dataset --data-dir outputs/demo/prepare_retriever_dataset \\
        --retriever-dir outputs/demo/train_retriever_t5_stage2/best --out-dir outputs/demo/prepare_reranker_dataset \\
        --reuse-retriever-runs --max-train-queries 3000 --max-val-queries 1000

For each split, either an existing run file of the retriever is reused (``--run-file
SPLIT=PATH``; no search) or the retriever (a T5 or LLaMA retriever folder) runs its constrained
beam search (avg.retriever.evaluate.evaluate_split) over the split's queries.

Training queries are searched against galleries of ``--train-gallery-size`` train images (the train
images, shuffled with the seed, cut into chunks; each query searches the chunk that holds its
image). With the test gallery's size (1,000 on the demo and Flickr30K), training lists are as hard
as test lists; the whole train gallery (0) makes them much harder (the retriever finds few golds
among 10,000+ images). Training lists always hold the positive (avg.reranker.data); val/test lists
are kept exactly as retrieved.

Writes ``{split}.jsonl`` (candidate lists), ``run_{split}.jsonl`` (the retriever's run on that
split, for the before/after table), ``meta.json`` (k, sources, gold-in-top-k per split) and
``stage.json``. With ``--control clip`` (the default when ``--emb-dir`` is given) also
``control/{val,test}.jsonl`` and ``control/run_{split}.jsonl``: the CLIP two-tower's own top-k over the
same galleries (exact search on the same features, scored by the cosine) -- the control of every
reranker claim: the same reranker, trained once on the same lists, over the two-tower's candidates
(finetune_reranker_llama selects its epoch for them on their own val lists; test_reranker_llama reports
``clip_two_tower+reranker`` beside ``avg_reranker``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from avg.artifacts.registry import manifest_name
from avg.artifacts.runfiles import read_run, retriever_run_files, write_run
from avg.metrics import retrieval_metrics
from avg.reranker.data import candidate_lists, clip_lists, list_stats, two_tower_records
from avg.reranker.embed import FeatureStore
from avg.search.gallery import Gallery
from avg.retriever.training import load_split
from avg.core.cli import add_device_arg, run_main
from avg.core.io import InputError, read_json, write_json, write_jsonl
from avg.core.seed import seeded_subset
from avg.core.stages import add_force_arg, begin_stage, skip_if_done
from avg.core.tracking import get_logger

STAGE = manifest_name("prepare_reranker_dataset")
CONTROL = "control"  # the two-tower's val/test lists, a folder of the stage
SALTS = {"train": 11, "val": 12, "test": 13}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="prepare_retriever_dataset/ folder ({split}.jsonl, gallery_{split}.json)")
    p.add_argument("--out-dir", required=True, help="output folder (prepare_reranker_dataset/)")
    p.add_argument("--retriever-dir", default=None, help="a saved retriever (T5 or LLaMA <out-dir>/best) to search splits without --run-file")
    p.add_argument("--run-file", action="append", default=[], metavar="SPLIT=PATH",
                   help="reuse an existing run file of the retriever for SPLIT instead of searching (repeatable)")
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits to prepare")
    p.add_argument("--topk", type=int, default=20, help="candidates kept per query")
    p.add_argument("--num-beams", type=int, default=0, help="beam size of the search (0: --topk)")
    p.add_argument("--max-train-queries", type=int, default=0, help="a seeded subset of N training queries (0: all)")
    p.add_argument("--max-val-queries", type=int, default=0, help="a seeded subset of N val queries (0: all)")
    p.add_argument("--max-test-queries", type=int, default=0, help="a seeded subset of N test queries (0: all)")
    p.add_argument("--reuse-retriever-runs", action="store_true",
                   help="for splits without --run-file, reuse the run files the retriever's trainer wrote next to "
                        "--retriever-dir (eval/run_test.jsonl, eval/run_val_epoch<best>.jsonl) when they exist")
    p.add_argument("--train-gallery-size", type=int, default=1000,
                   help="search each training query among a chunk of this many train images (0: the whole train gallery)")
    p.add_argument("--train-candidates", choices=("retriever", "clip"), default="retriever",
                   help="training lists from the retriever's search, or mined with CLIP (top-k cosine of the prepare_emb/ features "
                        "in the chunk of --train-gallery-size images holding the positive; retriever scores unknown)")
    p.add_argument("--emb-dir", default=None, help="prepare_emb/ folder (needed by --train-candidates clip)")
    p.add_argument("--batch-size", type=int, default=64, help="queries per search batch")
    p.add_argument("--max-length", type=int, default=0, help="max query tokens for the search (0: the retriever's)")
    p.add_argument("--collision-seed", type=int, default=0, help="seed of the order among images sharing a code")
    p.add_argument("--seed", type=int, default=42, help="seed of the query subsets and train gallery chunks")
    p.add_argument("--control", choices=("clip", "none"), default=None,
                   help="clip: also the two-tower's top-k val/test lists, the control (default: clip with --emb-dir)")
    add_device_arg(p)
    add_force_arg(p)
    args = p.parse_args(argv)
    if args.control is None:
        args.control = "clip" if args.emb_dir else "none"
    return args


def load_any_retriever(path: str | Path, device, data_dir: str | Path | None = None,
                       emb_dir: str | Path | None = None) -> dict:
    """A saved T5 (train_t5) or decoder-only (train_llama) retriever -> the keyword arguments of
    avg.retriever.evaluate.evaluate_split that search with it the way it was trained and tested
    (plus ``features``: the prepare_emb/ text features when it reads the query's CLIP feature)."""
    from avg.retriever import llama as L
    from avg.retriever.prefix import text_features_for
    from avg.retriever.t5 import load_t5_retriever

    path = Path(path)
    if (path / L.RETRIEVER_FILE).is_file():
        # bf16 on a GPU that has it (as evaluate_llama searches with it), float32 elsewhere
        dtype = L.resolve_dtype("auto", lora=True, device=torch.device(device) if device is not None else torch.device("cpu"))
        tok, model, vocab, meta = L.load_retriever(path, dtype=dtype, device=device)
        return {"model": L.search_model(model), "tokenizer": tok, "vocab": vocab,
                "format_query": L.prompt_formatter(meta["prompt_template"]), "max_length": int(meta.get("max_length", 96))}
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a saved retriever (no config.json / {L.RETRIEVER_FILE})")
    r = load_t5_retriever(path, device)
    out = {"model": r.model, "tokenizer": r.tokenizer, "vocab": r.vocab, **r.eval_kwargs()}
    if r.needs_features:
        if data_dir is None:
            raise InputError(f"{path}: this retriever reads the query's CLIP feature; pass the prepare_retriever_dataset/ folder")
        out["features"] = text_features_for(data_dir, emb_dir)[0]
    return out


def parse_run_files(items) -> dict:
    out = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep or split not in SALTS or not path:
            raise InputError(f"--run-file {item!r}: expected SPLIT=PATH with SPLIT in {sorted(SALTS)}")
        out[split] = path
    return out


def search_split(retriever: dict, queries: list, galleries: list[Gallery], *, num_beams: int, batch_size: int,
                 max_length: int, device, desc: str) -> list[dict]:
    """Run the retriever (load_any_retriever's dict); each query searches the gallery that holds its gold image."""
    from avg.retriever.evaluate import evaluate_split
    from avg.retriever.prefix import query_features

    kwargs = {k: v for k, v in retriever.items() if k not in ("model", "tokenizer", "vocab", "features")}
    if max_length:
        kwargs["max_length"] = max_length
    owner = {}
    for g, gal in enumerate(galleries):
        owner.update({i: g for i in gal.image_ids})
    records: dict = {}
    for g, gal in enumerate(galleries):
        mine = [q for q in queries if owner.get(q["image_id"]) == g]
        if not mine:
            continue
        if "features" in retriever:
            kwargs["query_features"] = query_features(retriever["features"], mine, source=desc)
        recs, _ = evaluate_split(retriever["model"], retriever["tokenizer"], retriever["vocab"], mine, gal, num_beams,
                                 batch_size, device, desc=f"{desc} {g + 1}/{len(galleries)}", **kwargs)
        records.update({r["qid"]: dict(r, gallery_size=len(gal)) for r in recs})
    return [records[q["qid"]] for q in queries if q["qid"] in records]


def control_lists(args, data_dir: Path, code_len, splits: list[str], log) -> dict:
    """{split: (lists, run records, stats)}: the two-tower's top-k of the split's queries over its gallery."""
    if not args.emb_dir:
        raise InputError("--control clip ranks by the CLIP features: pass --emb-dir")
    store = FeatureStore.load(args.emb_dir)
    out = {}
    for split in splits:
        limit = {"val": args.max_val_queries, "test": args.max_test_queries}[split]
        queries, gallery = load_split(data_dir, split, code_len, args.collision_seed)
        if not queries or gallery is None:
            continue
        queries = seeded_subset([dict(q, qid=q.get("qid", i)) for i, q in enumerate(queries)], limit, args.seed, SALTS[split])
        records = two_tower_records(queries, gallery, store, args.topk)
        lists = candidate_lists(records, args.topk, insert_positive=False)
        stats = {**list_stats(lists), "source": f"CLIP two-tower {args.emb_dir}", "gallery_size": len(gallery),
                 "retriever_metrics": retrieval_metrics(records, gallery_size=len(gallery))}
        log.info("control %s: the two-tower's top-%d, gold in it for %.2f%%", split, args.topk, stats["gold_in_topk"])
        out[split] = (lists, records, stats)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    log = get_logger("avg.reranker.prepare")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in SALTS]
    if bad:
        raise InputError(f"--splits: unknown split(s) {bad}")
    run_files = parse_run_files(args.run_file)
    if args.reuse_retriever_runs and args.retriever_dir:
        run_files = {**retriever_run_files(args.retriever_dir, [s for s in splits if s not in run_files]), **run_files}
    by_clip = "train" in splits and args.train_candidates == "clip" and "train" not in run_files
    if by_clip and not args.emb_dir:
        raise InputError("--train-candidates clip needs --emb-dir (the CLIP features)")
    need_search = [s for s in splits if s not in run_files and not (s == "train" and by_clip)]
    if need_search and not args.retriever_dir:
        raise InputError(f"splits {need_search} have no --run-file: pass --retriever-dir to search them")
    for split, path in run_files.items():
        if not Path(path).is_file():
            raise InputError(f"{path}: run file for {split} not found")
    num_beams = args.num_beams or args.topk
    if num_beams < args.topk:
        raise InputError(f"--num-beams {num_beams} < --topk {args.topk}: a beam returns at most num_beams images")
    data_dir = Path(args.data_dir)
    if not (data_dir / "meta.json").is_file() and not any(data_dir.glob("gallery_*.json")):
        raise InputError(f"{data_dir}: not a prepare_retriever_dataset/ folder (run scripts/prepare_retriever_dataset.sh first)")
    out_dir = Path(args.out_dir)
    run = begin_stage(out_dir, STAGE, vars(args), inputs=[args.data_dir, args.retriever_dir, args.emb_dir, *run_files.values()],
                      force=args.force, ignore=("batch_size",))
    if run.up_to_date and skip_if_done():
        log.info("%s: up to date, skipping", out_dir)
        return run.previous.get("summary") or {}
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    retriever = load_any_retriever(args.retriever_dir, device, args.data_dir, args.emb_dir) if need_search else None
    code_len = retriever["vocab"].code_len if retriever else None
    if code_len is None and (data_dir / "meta.json").is_file():
        code_len = read_json(data_dir / "meta.json").get("code_len")
    meta = {"topk": args.topk, "num_beams": num_beams, "splits": {}}
    outputs = {}
    for split in splits:
        limit = {"train": args.max_train_queries, "val": args.max_val_queries, "test": args.max_test_queries}[split]
        if split in run_files:
            records = [r.to_json() for r in read_run(run_files[split])]
            records = seeded_subset(records, limit, args.seed, SALTS[split])
            source, gallery_size = f"run file {run_files[split]}", None
            gal_path = data_dir / f"gallery_{split}.json"
            if gal_path.is_file():
                gallery_size = len(Gallery.load(gal_path))
        else:
            queries, gallery = load_split(data_dir, split, code_len, args.collision_seed)
            if not queries or gallery is None:
                raise InputError(f"{data_dir}: no {split}.jsonl / gallery_{split}.json")
            queries = seeded_subset([dict(q, qid=q.get("qid", i)) for i, q in enumerate(queries)], limit, args.seed, SALTS[split])
            galleries = gallery.chunks(args.train_gallery_size, args.seed) if split == "train" else [gallery]
            if split == "train" and by_clip:
                log.info("train: mining the CLIP top-%d of %d queries among %d galler%s of ~%d images", args.topk,
                         len(queries), len(galleries), "y" if len(galleries) == 1 else "ies", len(galleries[0]))
                lists = clip_lists(queries, galleries, FeatureStore.load(args.emb_dir), args.topk)
                records = [{"qid": x["qid"], "query": x["query"], "gold": x["gold"], "ranked": x["candidates"],
                            "scores": [float("nan")] * len(x["candidates"])} for x in lists]
                source, gallery_size = f"CLIP features {args.emb_dir}", len(galleries[0])
            else:
                log.info("%s: searching %d queries over %d galler%s of ~%d images (beam %d)", split, len(queries),
                         len(galleries), "y" if len(galleries) == 1 else "ies", len(galleries[0]), num_beams)
                records = search_split(retriever, queries, galleries, num_beams=num_beams, batch_size=args.batch_size,
                                       max_length=args.max_length, device=device, desc=f"search {split}")
                source, gallery_size = f"retriever {args.retriever_dir}", len(galleries[0])
        if not records:
            raise InputError(f"{split}: no queries to prepare")
        if not (split == "train" and by_clip):
            lists = candidate_lists(records, args.topk, insert_positive=(split == "train"))
        stats = {**list_stats(lists), "source": source, "gallery_size": gallery_size}
        if split != "train":
            stats["retriever_metrics"] = retrieval_metrics(records, gallery_size=gallery_size)
        meta["splits"][split] = stats
        outputs[split] = (lists, [{k: r[k] for k in ("qid", "query", "gold", "ranked", "scores")} for r in records])
        log.info("%s: %d lists, gold in top-%d for %.2f%% (%d positives inserted) [%s]", split, len(lists), args.topk,
                 stats["gold_in_topk"], stats["inserted"], source)
    control = control_lists(args, data_dir, code_len, [s for s in splits if s != "train"], log) \
        if args.control == "clip" else {}
    if control:
        meta["control"] = {split: stats for split, (_, _, stats) in control.items()}
    for split, (lists, records) in outputs.items():  # written only when every split succeeded
        write_jsonl(lists, out_dir / f"{split}.jsonl")
        write_run(records, out_dir / f"run_{split}.jsonl")
    for split, (lists, records, _) in control.items():
        write_jsonl(lists, out_dir / CONTROL / f"{split}.jsonl")
        write_run(records, out_dir / CONTROL / f"run_{split}.jsonl")
    write_json(meta, out_dir / "meta.json")
    run.complete(summary={f"{s}/gold_in_topk": v["gold_in_topk"] for s, v in meta["splits"].items()})
    return meta


if __name__ == "__main__":
    run_main(main)
