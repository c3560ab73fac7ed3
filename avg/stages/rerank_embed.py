"""Stage: embedding rerank of a retriever's top-k (avg.reranker.embed), the fusion weight chosen on val.

    python -m avg.stages.rerank_embed --retriever-dir outputs/demo/train_retriever_t5_stage2/best \\
        --emb-dir outputs/demo/prepare_emb --data-dir outputs/demo/prepare_retriever_dataset --out-dir outputs/demo/rerank_embed

Reads the retriever's own run files (``eval/run_val_epoch<best>.jsonl``, ``eval/run_test.jsonl``),
chooses ``w`` of ``cos + w * s_ret`` by val R@1 over ``--weights``, applies it to test and writes
``run_{val,test}.jsonl``, ``fusion.json`` (the val grid and the chosen weight) and
``metrics_test.json`` with the list's recall (``list_recall``, the ceiling), the retriever's metrics
on the same list (``before``) and the reranking cost per query.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from avg.artifacts.registry import manifest_name
from avg.artifacts.runfiles import read_run, retriever_run_files, write_run
from avg.metrics import recall_ks, retrieval_metrics
from avg.reranker.embed import DEFAULT_WEIGHTS, FeatureStore, choose_weight, embed_rerank_system, rerank_records
from avg.search.gallery import Gallery
from avg.core.cli import run_main
from avg.core.io import InputError, write_json
from avg.core.stages import add_force_arg, begin_stage, skip_if_done
from avg.core.tracking import RunLogger

STAGE = manifest_name("rerank_embed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--retriever-dir", required=True, help="the retriever's best/ folder (its eval/ run files are read)")
    p.add_argument("--emb-dir", required=True, help="prepare_emb/ folder: the CLIP features of queries and images")
    p.add_argument("--data-dir", default=None, help="prepare_retriever_dataset/ folder (gallery sizes for mean rank)")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--topk", type=int, default=50, help="candidates re-scored per query (at most the retriever's beam)")
    p.add_argument("--weights", default=None, help="comma-separated fusion weights tried on val ('inf': retriever order); "
                   f"default {','.join(str(w) for w in DEFAULT_WEIGHTS)}")
    p.add_argument("--retriever-name", default="retriever", help="system name of the retriever in the metrics")
    p.add_argument("--wandb-project", default="avg", help="wandb project (offline unless WANDB_MODE=online)")
    p.add_argument("--run-name", default=None, help="run name for logs and wandb")
    add_force_arg(p)
    return p.parse_args(argv)


def _weights(text):
    if not text:
        return DEFAULT_WEIGHTS
    try:
        return tuple(math.inf if w.strip() == "inf" else float(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise InputError(f"--weights {text!r}: expected comma-separated numbers or 'inf'") from None


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.topk < 1:
        raise InputError(f"--topk must be >= 1, got {args.topk}")
    weights = _weights(args.weights)
    runs = retriever_run_files(args.retriever_dir, ("val", "test"))
    for split in ("val", "test"):
        if split not in runs:
            raise InputError(f"{Path(args.retriever_dir).parent / 'eval'}: no {split} run file of the best epoch "
                             "(train and test the retriever first)")
    store = FeatureStore.load(args.emb_dir)
    records = {s: [r.to_json() for r in read_run(runs[s])] for s in ("val", "test")}
    for s in ("val", "test"):  # the error names the run file that holds the short lists
        depth = min((len(r["ranked"]) for r in records[s] if r["ranked"]), default=0)
        if depth < args.topk:
            raise InputError(f"{runs[s]}: lists of {depth} images, fewer than --topk {args.topk} "
                             "(search with a beam >= topk)")
    sizes = {s: None for s in ("val", "test")}
    if args.data_dir:
        for s in sizes:
            path = Path(args.data_dir) / f"gallery_{s}.json"
            sizes[s] = len(Gallery.load(path)) if path.is_file() else None
    out_dir = Path(args.out_dir)
    run = begin_stage(out_dir, STAGE, vars(args), inputs=[args.retriever_dir, args.emb_dir, *runs.values()], force=args.force)
    if run.up_to_date and skip_if_done():
        return run.previous.get("summary") or {}
    logger = RunLogger(out_dir, project=args.wandb_project, run_name=args.run_name or STAGE, config=vars(args), job_type=STAGE)
    weight, grid = choose_weight(records["val"], store, args.topk, weights, gallery_size=sizes["val"])
    for row in grid:
        logger.info("val: w=%s R@1=%.2f R@5=%.2f R@10=%.2f", row["weight"], row["R@1"], row.get("R@5", float("nan")),
                    row.get("R@10", float("nan")))
    logger.info("chosen on val: w=%s", weight)
    out, reranked_of = {}, {}
    for split in ("val", "test"):
        recs = records[split]
        t0 = time.perf_counter()
        reranked = rerank_records(recs, store, weight, args.topk, source=runs[split])
        seconds = time.perf_counter() - t0
        ks = recall_ks(args.topk)
        before = retrieval_metrics([{**r, "ranked": r["ranked"][:args.topk]} for r in recs], ks=ks, gallery_size=sizes[split])
        after = retrieval_metrics(reranked, ks=ks, gallery_size=sizes[split])
        out[split] = {"system": embed_rerank_system(args.retriever_name), "split": split, **after, "topk": args.topk,
                      "fusion_weight": weight, "list_recall": before[f"R@{args.topk}"],
                      "before": {"system": args.retriever_name, **before},
                      "ms_per_query": 1000.0 * seconds / max(len(recs), 1), "queries_per_s": len(recs) / max(seconds, 1e-9)}
        reranked_of[split] = reranked
        logger.info("%s: %s (list recall R@%d %.2f; %.3f ms/query)", split,
                    ", ".join(f"R@{k} {before[f'R@{k}']:.2f} -> {after[f'R@{k}']:.2f}" for k in ks if k < args.topk),
                    args.topk, before[f"R@{args.topk}"], out[split]["ms_per_query"])
    for split, reranked in reranked_of.items():  # written once both splits are reranked: nothing half-done
        write_run(reranked, out_dir / f"run_{split}.jsonl")
    write_json({"chosen_weight": weight, "selected_by": "val R@1", "val_grid": grid, "val": out["val"]}, out_dir / "fusion.json")
    write_json(out["test"], out_dir / "metrics_test.json")
    logger.log({f"eval/test/{k}": v for k, v in out["test"].items() if isinstance(v, (int, float))})
    logger.summary({f"test/{k}": v for k, v in out["test"].items() if isinstance(v, (int, float))})
    run.complete({k: out["test"][k] for k in ("R@1", "R@5", "R@10", "fusion_weight") if k in out["test"]})
    logger.finish()
    return out


if __name__ == "__main__":
    run_main(main)
