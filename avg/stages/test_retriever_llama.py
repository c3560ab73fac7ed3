"""Evaluate a saved decoder-only retriever: constrained beam search over a split's gallery.

    python -m avg.stages.test_retriever_llama --retriever-dir outputs/demo/finetune_retriever_llama/best \\
        --data-dir outputs/demo/prepare_retriever_dataset --split test --out-dir outputs/demo/test_retriever_llama
    torchrun --nproc_per_node 4 -m avg.stages.test_retriever_llama ...   # queries sharded over processes

The search is avg.search.beam.constrained_beam_search: deterministic (no sampling), every
setting explicit (``--num-beams``, EOS scored, full-vocabulary or ``--fast-search`` scores); the
checkpoint's generation_config is never read (and is reset to greedy on load). Prompts are the
retriever's own template, left-padded, and the constraint starts right after them.

Writes ``run_<split>.jsonl`` (one ranked list per query), ``metrics_<split>.json`` (R@1/5/10,
mean rank, "system", "split", search settings, queries/s), ``eval.log``, ``metrics.jsonl`` and
``stage.json`` (another configuration or split needs its own --out-dir, or ``--force``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch.distributed as dist

from avg.artifacts.registry import manifest_name
from avg.metrics import format_metrics
from avg.artifacts.runfiles import write_run
from avg.retriever import llama as L
from avg.retriever.evaluate import evaluate_split
from avg.retriever.training import check_data_matches_vocab, load_split
from avg.core.devices import process_device
from avg.retriever.vocab import VokenVocab
from avg.core.io import InputError, write_json
from avg.core.stages import add_force_arg, begin_stage, skip_if_done
from avg.core.tracking import RunLogger, get_logger
from avg.core.cli import add_device_arg, run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retriever-dir", required=True, help="a saved retriever (train_llama's out-dir/best)")
    p.add_argument("--data-dir", required=True, help="prepare_retriever_dataset/ folder ({split}.jsonl and gallery_{split}.json)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which queries and gallery")
    p.add_argument("--out-dir", required=True, help="where run_<split>.jsonl and metrics_<split>.json go")
    p.add_argument("--base-model", default=None, help="base model path/name for a LoRA retriever (default: the recorded one)")
    p.add_argument("--num-beams", type=int, default=20, help="beam size = length of each ranked list of codes")
    p.add_argument("--batch-size", type=int, default=16, help="queries per search batch (bounds memory)")
    p.add_argument("--max-queries", type=int, default=0, help="a seeded random subset of N queries (0: all)")
    p.add_argument("--seed", type=int, default=42, help="seed of the --max-queries subset")
    p.add_argument("--fast-search", action="store_true", help="score over voken logits only (renormalised; see avg.search.beam)")
    p.add_argument("--no-eos-score", action="store_true", help="rank by the code's log-probability without log p(EOS | code)")
    p.add_argument("--no-merge", action="store_true", help="keep LoRA unmerged (slower; for checking the merge)")
    p.add_argument("--model-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights dtype (auto: bf16 on a bf16-capable GPU, else float32)")
    p.add_argument("--collision-seed", type=int, default=0, help="seed of the order among images sharing a code")
    p.add_argument("--system", default=L.SYSTEM, help="system name written into the metrics json")
    add_device_arg(p)
    p.add_argument("--wandb-project", default="avg", help="wandb project (offline unless WANDB_MODE=online)")
    p.add_argument("--run-name", default=None, help="run name for logs and wandb")
    p.add_argument("--sample-queries", type=int, default=8, help="seeded queries shown with gold and top-5 images in samples_<split>.md and wandb (0: none)")
    p.add_argument("--image-root", default=None, help="image folder for the thumbnails (default: the one recorded in prepare_emb/index.json beside --data-dir)")
    p.add_argument("--annotations", default=None, help="Karpathy json mapping image ids to files under --image-root (default: prepare_retriever_dataset/meta.json's)")
    add_force_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = process_device(args.device == "cpu")
    if args.fast_search and args.no_merge:
        raise InputError("--fast-search needs a merged model (drop --no-merge)")
    # inputs are checked before anything under --out-dir is written
    saved_vocab = VokenVocab.load(args.retriever_dir)
    L.read_retriever_meta(args.retriever_dir)  # is it a LLaMA retriever at all?
    check_data_matches_vocab(args.data_dir, saved_vocab, Path(args.retriever_dir) / "voken_vocab.json")
    code_len = saved_vocab.code_len
    queries, gallery = load_split(Path(args.data_dir), args.split, code_len, args.collision_seed)
    if not queries or gallery is None:
        raise InputError(f"{args.data_dir}: no {args.split}.jsonl / gallery_{args.split}.json")
    out_dir = Path(args.out_dir)
    run = begin_stage(out_dir, manifest_name("test_retriever_llama"), vars(args), force=args.force, mark_running=False,
                      inputs=[args.retriever_dir, args.data_dir, args.base_model])
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank has read the manifest before the main process rewrites it
    if run.up_to_date and skip_if_done():
        get_logger("avg.test_llama").info("test_llama: outputs in %s are complete and up to date; skipping", out_dir)
        return dict(run.previous.get("summary") or {})
    run.running()
    logger = RunLogger(out_dir, project=args.wandb_project, run_name=args.run_name or f"llama-test-{args.split}",
                       job_type=manifest_name("test_retriever_llama"), config=vars(args), log_name="eval.log")
    dtype = L.resolve_dtype(args.model_dtype, lora=True, device=device)
    tokenizer, model, vocab, meta = L.load_retriever(args.retriever_dir, base_model=args.base_model,
                                                     merge=not args.no_merge, dtype=dtype, device=device)
    n_total = len(queries)
    queries = L.query_subset(queries, args.max_queries, args.seed, 3)
    logger.info("%s: %d of %d %s queries, gallery %d images, %d beams, dtype %s, device %s",
                args.retriever_dir, len(queries), n_total, args.split, len(gallery), args.num_beams, dtype, device)
    t0 = time.time()
    records, metrics = evaluate_split(L.search_model(model), tokenizer, vocab, queries, gallery, args.num_beams,
                                      args.batch_size, device, max_length=int(meta.get("max_length", 96)),
                                      format_query=L.prompt_formatter(meta["prompt_template"]),
                                      desc=f"search {args.split}", restrict_to_vokens=args.fast_search,
                                      score_eos=not args.no_eos_score)
    seconds = time.time() - t0
    metrics = {**metrics, "system": args.system, "split": args.split, "retriever_dir": str(args.retriever_dir),
               "base_model": args.base_model or meta["base_model"], "lora": bool(meta["lora"]),
               "prompt_template": meta["prompt_template"], "queries_total": n_total,
               "search": {"num_beams": args.num_beams, "do_sample": False, "score_eos": not args.no_eos_score,
                          "fast_search": args.fast_search, "merged": not args.no_merge, "dtype": str(dtype).replace("torch.", "")},
               "seconds": seconds, "queries_per_s": len(queries) / max(seconds, 1e-9)}
    if logger.enabled:
        write_run(records, out_dir / f"run_{args.split}.jsonl")
        write_json(metrics, out_dir / f"metrics_{args.split}.json")
        if args.sample_queries > 0:
            from avg.data.sample_tables import log_sample_table, resolve_image_paths

            paths = resolve_image_paths(image_root=args.image_root, annotations=args.annotations, data_dir=args.data_dir)
            log_sample_table(logger, records, paths, n=args.sample_queries, seed=args.seed, out_dir=out_dir, name=args.split)
        run.complete({k: metrics[k] for k in ("R@1", "R@5", "R@10", "mean_rank") if k in metrics})
    logger.info("%s %s: %s (%.2f queries/s)", args.system, args.split, format_metrics(metrics), metrics["queries_per_s"])
    logger.log({f"eval/{args.split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    logger.summary({f"{args.split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float, str))})
    logger.finish()
    return metrics


if __name__ == "__main__":
    run_main(main)
