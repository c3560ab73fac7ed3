"""Rerank a split's retriever top-k lists with a saved reranker; R@K before and after, one protocol.

    python -m avg.stages.test_reranker_llama --reranker-dir outputs/demo/finetune_reranker_llama/best \\
        --data-dir outputs/demo/prepare_reranker_dataset --split test --out-dir outputs/demo/test_reranker_llama
    torchrun --nproc_per_node 4 -m avg.stages.test_reranker_llama ...   # lists sharded over processes

Both rankings of the same lists are scored by avg.metrics.retrieval_metrics with the
split's gallery size (a gold image outside the top-k is a miss before and after, at rank =
gallery size for the mean rank). Writes ``run_<split>.jsonl`` (reranked), ``metrics_<split>.json``
(system "avg_reranker", with the before-reranking metrics under "before"),
``metrics_<retriever>_top<k>_<split>.json`` (the retriever's order of the same lists, its own
system name, so the results table shows both), ``eval.log``, ``metrics.jsonl`` and ``stage.json``. Where the
data holds the two-tower's lists (``control/``) and the trainer saved ``best_control/`` beside ``--reranker-dir``,
the same reranker reorders them too: ``run_control_<split>.jsonl``, ``metrics_control_<split>.json`` (system
"clip_two_tower+reranker", the control row of every reranker claim) and ``metrics_clip_two_tower_top<k>_<split>.json``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch.distributed as dist

from avg.artifacts.registry import manifest_name
from avg.artifacts.runfiles import write_run
from avg.metrics import format_metrics, recall_ks, retrieval_metrics
from avg.reranker import scoring
from avg.reranker.data import load_lists
from avg.reranker.step import LmRerankStep
from avg.retriever import llama as L
from avg.core.cli import add_device_arg, run_main
from avg.core.devices import process_device
from avg.core.io import InputError, read_json, write_json
from avg.core.seed import seeded_subset
from avg.core.stages import add_force_arg, begin_stage, skip_if_done
from avg.core.tracking import RunLogger

SYSTEM = "avg_reranker"
CONTROL = "control"  # prepare_reranker_dataset/control/: the two-tower's lists
BEST_CONTROL = "best_control"  # finetune_reranker_llama/best_control/: the epoch chosen on them
CONTROL_SYSTEM, CONTROL_RETRIEVER = "clip_two_tower+reranker", "clip_two_tower"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reranker-dir", required=True, help="a saved reranker (avg.stages.finetune_reranker_llama's out-dir/best)")
    p.add_argument("--data-dir", required=True, help="prepare_reranker_dataset/ folder ({split}.jsonl, meta.json)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which candidate lists")
    p.add_argument("--out-dir", required=True, help="where run and metrics files go")
    p.add_argument("--emb-dir", default=None, help="prepare_emb/ folder of the CLIP features (default: the one the reranker was trained with)")
    p.add_argument("--base-model", default=None, help="base model path/name for a LoRA reranker (default: the recorded one)")
    p.add_argument("--batch-size", type=int, default=16, help="lists per scoring batch (x top-k sequences)")
    p.add_argument("--max-queries", type=int, default=0, help="a seeded random subset of N lists (0: all)")
    p.add_argument("--seed", type=int, default=42, help="seed of the --max-queries subset")
    p.add_argument("--no-shared-prefix", action="store_true", help="score every (query, candidate) sequence in full (slower; same scores)")
    p.add_argument("--model-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights dtype (auto: bf16 on a bf16-capable GPU, else float32)")
    p.add_argument("--retriever-name", default="retriever", help="system name of the retriever in the before-reranking metrics file")
    p.add_argument("--system", default=SYSTEM, help="system name written into the metrics json")
    add_device_arg(p)
    p.add_argument("--wandb-project", default="avg", help="wandb project (offline unless WANDB_MODE=online)")
    p.add_argument("--run-name", default=None, help="run name for logs and wandb")
    add_force_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    data_dir, out_dir = Path(args.data_dir), Path(args.out_dir)
    lists = load_lists(data_dir / f"{args.split}.jsonl")
    meta = read_json(data_dir / "meta.json") if (data_dir / "meta.json").is_file() else {}
    split_meta = meta.get("splits", {}).get(args.split, {})
    gallery_size = split_meta.get("gallery_size")
    if args.split == "train" and split_meta.get("inserted"):
        raise InputError(f"{data_dir / 'train.jsonl'}: training lists hold inserted positives; evaluate val or test")
    store = LmRerankStep.check(args.reranker_dir, args.emb_dir)  # before the stage starts writing
    run = begin_stage(out_dir, manifest_name("test_reranker_llama"), vars(args), inputs=[args.reranker_dir, args.data_dir, args.emb_dir], force=args.force,
                      ignore=("batch_size", "no_shared_prefix"))
    if run.up_to_date and skip_if_done():
        return run.previous.get("summary") or {}
    device = process_device(args.device == "cpu")
    logger = RunLogger(out_dir, project=args.wandb_project, run_name=args.run_name or f"reranker-{args.split}",
                       job_type=manifest_name("test_reranker_llama"), config=vars(args), log_name="eval.log")
    metrics = rerank_split(args, step_for(args, args.reranker_dir, store, device), lists, data_dir / f"{args.split}.jsonl",
                           gallery_size, logger, out_dir, system=args.system, retriever=args.retriever_name)
    control_dir = Path(args.reranker_dir).parent / BEST_CONTROL
    control_path = data_dir / CONTROL / f"{args.split}.jsonl"
    if control_dir.is_dir() and control_path.is_file():  # the same reranker over the two-tower's own top-k
        control = rerank_split(args, step_for(args, control_dir, store, device), load_lists(control_path), control_path,
                               (meta.get("control", {}).get(args.split) or {}).get("gallery_size", gallery_size), logger,
                               out_dir, system=CONTROL_SYSTEM, retriever=CONTROL_RETRIEVER, tag="control_")
        metrics["control"] = {k: v for k, v in control.items() if k.startswith("R@") or k in ("list_recall", "reranker_dir")}
    logger.finish()
    run.complete(summary={**{c: v for c, v in metrics.items() if c.startswith("R@")}, "before_R@1": metrics["before"]["R@1"],
                          **({"control_R@1": metrics["control"]["R@1"]} if "control" in metrics else {})})
    return metrics


def step_for(args, reranker_dir, store, device) -> LmRerankStep:
    return LmRerankStep.load(reranker_dir, device=device, base_model=args.base_model, store=store,
                             dtype=L.resolve_dtype(args.model_dtype, lora=True, device=device))


def rerank_split(args, step: LmRerankStep, lists: list, source: Path, gallery_size, logger, out_dir: Path, *,
                 system: str, retriever: str, tag: str = "") -> dict:
    """Rerank one set of a split's lists (sharded over the processes), write its run file and metrics (``tag``
    prefixes the file names: ``control_`` for the two-tower's lists) and return the metrics."""
    reranker, rmeta = step.reranker, step.meta
    n_total = len(lists)
    lists = seeded_subset(lists, args.max_queries, args.seed, 3)
    ds = step.dataset(lists, str(source))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    logger.info("%s: reranking %d of %d %s lists (top-%d) of %s on %s, fusion %s (w=%.3f)", step.path, len(lists),
                n_total, args.split, max(len(x["candidates"]) for x in lists), source, step.device, rmeta["fusion"],
                float(reranker.fusion_weight.detach()))
    t0 = time.time()
    scores = scoring.score_lists(reranker, ds, args.batch_size, step.device, desc=f"rerank {tag}{args.split}",
                                 autocast=step.autocast, indices=range(rank, len(ds), world),
                                 share_prefix=not args.no_shared_prefix, show_progress=rank == 0)
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, scores)
        scores = {i: v for part in parts for i, v in part.items()}
    seconds = time.time() - t0
    records = scoring.reranked_records(lists, scores)
    before_records = [{"qid": x["qid"], "query": x["query"], "gold": x["gold"], "ranked": x["candidates"],
                       "scores": [s if s is not None else float("nan") for s in x["scores"]]} for x in lists]
    k = max(len(x["candidates"]) for x in lists)
    after = retrieval_metrics(records, ks=recall_ks(k), gallery_size=gallery_size)
    before = retrieval_metrics(before_records, ks=recall_ks(k), gallery_size=gallery_size)
    before_system = f"{retriever}_top{k}"
    metrics = {**after, "system": system, "split": args.split, "reranker_dir": str(step.path),
               "base_model": args.base_model or rmeta["base_model"], "lora": bool(rmeta["lora"]), "topk": k,
               "fusion": rmeta["fusion"], "fusion_weight": float(reranker.fusion_weight.detach()),
               "embed_fusion": rmeta.get("embed_fusion", "none"), "embed_weight": float(reranker.embed_weight.detach()),
               "image_prefix": int(rmeta.get("image_prefix", 0)), "feature_head": bool(rmeta.get("feature_head", False)),
               "late_interaction": not bool(rmeta.get("candidate_tokens", True)), "list_recall": before[f"R@{k}"],
               "ms_per_query": 1000.0 * seconds / max(len(lists), 1),
               "queries_total": n_total, "before": {**before, "system": before_system},
               "seconds": seconds, "queries_per_s": len(lists) / max(seconds, 1e-9)}
    if logger.enabled:
        write_run(records, out_dir / f"run_{tag}{args.split}.jsonl")
        write_json(metrics, out_dir / f"metrics_{tag}{args.split}.json")
        write_json({**before, "system": before_system, "split": args.split, "topk": k,
                    "note": "the order of the lists the reranker saw, as their system returned them"},
                   out_dir / f"metrics_{before_system}_{args.split}.json")
    cols = [f"R@{x}" for x in recall_ks(k)]
    table = ["| ranking | " + " | ".join(cols) + " | mean rank |", "|---" * (len(cols) + 2) + "|"]
    for name, m in ((before_system, before), (system, after)):
        table.append(f"| {name} | " + " | ".join(f"{m[c]:.2f}" for c in cols) + f" | {m['mean_rank']:.2f} |")
    logger.info("%s %s (%d queries, %.1f lists/s):\n%s", system, args.split, len(lists), metrics["queries_per_s"],
                "\n".join(table))
    logger.info("before: %s | after: %s", format_metrics(before), format_metrics(after))
    logger.log({**{f"eval/{tag}{args.split}/{k_}": v for k_, v in after.items() if isinstance(v, (int, float))},
                **{f"eval/{tag}{args.split}_before/{k_}": v for k_, v in before.items() if isinstance(v, (int, float))}})
    logger.summary({f"{tag}{args.split}/{k_}": v for k_, v in metrics.items() if isinstance(v, (int, float, str))})
    if logger.wandb_run is not None:
        import wandb
        logger.wandb_run.log({f"{tag}{args.split}/rerank_table": wandb.Table(
            columns=["ranking", *cols, "mean_rank"],
            data=[[n, *[m[c] for c in cols], m["mean_rank"]] for n, m in ((before_system, before), (system, after))])})
    return metrics


if __name__ == "__main__":
    run_main(main)
