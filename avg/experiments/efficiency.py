"""Efficiency benchmark (the paper's Figure 4): queries/s versus gallery size, generative vs two-tower.

    python -m avg.experiments.efficiency --retriever-dir outputs/demo/train_retriever_t5/best \\
        --emb-dir outputs/demo/prepare_emb --codes-dir outputs/demo/generate_codes --out-dir outputs/demo/efficiency

Two systems answer the same seeded sample of caption queries on the same device, in one run:

* ``avg``  -- the generative retriever: tokenise the query, constrained beam search (``--num-beams``)
  over the gallery's ``CodeIndex``, generated codes -> image ids (avg.search.gallery); weights in
  ``--retriever-dtype`` (auto: bf16 on a GPU that has it, like the CLIP tower's fp16 autocast there;
  fp32 on the CPU), so neither side is timed at a precision the other is spared.
* ``clip_fp32`` / ``clip_fp16`` -- the CLIP two-tower: encode the query with the CLIP text tower
  named in ``prepare_emb/index.json``, exact inner-product search over the gallery's feature matrix
  (stored and multiplied in that precision, already on the device), ``torch.topk`` -> image ids.

What is timed is the same for both: query text in -> ranked image ids out (``--num-beams`` of them
on both sides), text encoding included, after ``--warmup`` untimed calls; CUDA is synchronised
before each clock read. Building the search structure (code index / moving features to the device)
is done once per gallery and reported apart (``build_s``). Each point is measured at batch size 1
(``latency_ms`` = median per query) and at ``--batch-size`` (``queries_per_s`` = queries / summed
call time). A point stops after ``--max-seconds`` of timed calls (at least one call); the CSV's
``time_boxed`` column says when fewer than ``--num-queries`` were timed.
Memory: ``structure_mb`` is the code index (CSR tensors) for ``avg`` and the feature matrix for
CLIP; the row -> image-id lists/maps of both sides are Python objects and are not counted.

Gallery scaling (synthetic images beyond the real ones): avg.experiments.scaling. The systems timed:
avg.experiments.systems.

Writes ``efficiency.csv`` (one row per gallery size x system x batch mode), ``efficiency.json``
(config, device, rows) and ``efficiency.png`` (log-scale gallery axis) under ``--out-dir``;
metrics and the plot go to RunLogger (wandb offline by default).
"""
from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from avg.core.io import InputError, atomic_open, write_json
from avg.core.seed import set_seed
from avg.experiments.plots import plot_curves, plot_throughput
from avg.experiments.scaling import scale_rows
from avg.experiments.systems import AnnSystem, GenerativeSystem, TwoTowerSystem, retriever_dtype
from avg.experiments.timing import benchmark

CSV_COLUMNS = ["gallery_size", "num_real", "system", "precision", "mode", "batch_size", "depth", "knob", "knob_value",
               "default_knob", "queries_timed", "seconds", "queries_per_s", "latency_ms", "latency_ms_p90", "time_boxed",
               "structure_mb", "build_s", "R@1", "R@10", "exact_R@10", "curve_recall", "pareto", "device"]


# ------------------------------------------------------------------------------------ inputs and outputs
def load_real_gallery(emb_dir, codes_dir, split: str) -> dict:
    """Real images that have both a feature row and a code; the query split's images first."""
    from avg.artifacts.emb import load_emb
    from avg.retriever.data import read_codes

    emb = load_emb(emb_dir)
    codes = read_codes(codes_dir, with_codebook=False)
    rows = [r for r, im in enumerate(emb.images) if im["image_id"] in codes.images]
    if not rows:
        raise InputError(f"{Path(codes_dir) / 'codes.json'}: no image of {Path(emb_dir) / 'index.json'} has a code")
    rows.sort(key=lambda r: emb.images[r]["split"] != split)  # stable: the query split first
    ids = [emb.images[r]["image_id"] for r in rows]
    first = sum(emb.images[r]["split"] == split for r in rows)
    if first == 0:
        raise InputError(f"{Path(emb_dir) / 'index.json'}: no images in split {split!r} with a code")
    return {"image_ids": ids, "features": np.asarray(emb.image_features[np.array(rows)], dtype=np.float32),
            "codes": np.array([codes.images[i]["code"] for i in ids], dtype=np.int64), "first": first, "emb": emb}


def sample_queries(emb, split: str, n: int, seed: int) -> list[dict]:
    rows = emb.caption_rows(split)
    if len(rows) == 0:
        raise InputError(f"prepare_emb/index.json: no captions in split {split!r}")
    pick = np.sort(np.random.default_rng([seed, 5]).choice(len(rows), min(n, len(rows)), replace=False))
    return [{"query": emb.captions[rows[i]]["text"], "gold": emb.images[emb.captions[rows[i]]["image_row"]]["image_id"]}
            for i in pick]


def write_outputs(rows: list[dict], out_dir: Path, config: dict, device_info: dict) -> dict:
    """efficiency.csv / .json / .png, atomically; returns their paths."""
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / "efficiency.csv") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    write_json({"config": config, "device": device_info, "rows": rows}, out_dir / "efficiency.json")
    import pandas as pd

    df = pd.DataFrame(rows)
    title = f"{device_info.get('name', '')}: text in -> ranked ids out"
    default = df[df["default_knob"].astype(bool)] if "default_knob" in df else df
    plot_throughput(default, out_dir / "efficiency.png", title=title)
    paths = {k: str(out_dir / f"efficiency.{k}") for k in ("csv", "json", "png")}
    curves = plot_curves(df, out_dir / "curves.png", title=title)
    if curves is not None:
        paths["curves"] = str(curves)
    scale = scale_rows(rows, int(config.get("dim") or 0))
    if scale:
        import csv as _csv

        with atomic_open(out_dir / "scale.csv") as f:
            w = _csv.DictWriter(f, fieldnames=list(scale[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(scale)
        paths["scale"] = str(out_dir / "scale.csv")
    return paths


def parse_sweep(specs: Sequence[str]) -> dict:
    """``["hnsw=16,64", "avg=10,20"]`` -> {"hnsw": [16, 64], "avg": [10, 20]}."""
    out = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        try:
            out[name.strip()] = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--sweep {spec!r}: expected SYSTEM=V1,V2,... with integer values") from None
        if not name.strip() or not out[name.strip()]:
            raise InputError(f"--sweep {spec!r}: expected SYSTEM=V1,V2,...")
    return out


def device_description(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "torch": torch.__version__}
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"type": "cpu", "name": f"CPU ({model}, {torch.get_num_threads()} torch threads)",
            "cores": os.cpu_count(), "torch": torch.__version__}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avg.experiments.efficiency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retriever-dir", required=True, help="a saved seq2seq retriever (train_t5's out-dir/best)")
    p.add_argument("--emb-dir", required=True, help="prepare_emb/ (image features, captions, and the CLIP encoder that made them)")
    p.add_argument("--codes-dir", required=True, help="generate_codes/ (codes.json: the real images' voken codes)")
    p.add_argument("--out-dir", required=True, help="where efficiency.{csv,json,png} and the log go")
    p.add_argument("--gallery-sizes", default="1000,10000,100000,300000,1000000",
                   help="comma-separated gallery sizes (beyond the real images: synthetic, see above)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split whose captions are the queries (its images come first)")
    p.add_argument("--num-queries", type=int, default=64, help="seeded sample of query captions, the same for every point")
    p.add_argument("--batch-size", type=int, default=32, help="queries per call in the batched mode")
    p.add_argument("--num-beams", type=int, default=20, help="beam size of the generative search = ranked list depth of both systems")
    p.add_argument("--precisions", default="fp32,fp16", help="CLIP feature matrix precisions to time (comma-separated: fp32, fp16)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="time box of one point (system x mode x size) in timed seconds")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before each point")
    p.add_argument("--noise-std", type=float, default=0.1, help="norm of the Gaussian perturbation of a synthetic image's feature")
    p.add_argument("--retriever-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights of the generative retriever while timed (auto: bf16 on a bf16-capable GPU, fp32 elsewhere)")
    p.add_argument("--fast-search", action="store_true", help="generative search over voken logits only (see avg.search.beam)")
    p.add_argument("--no-eos-score", action="store_true", help="do not add log p(EOS | code) to code scores")
    p.add_argument("--rerank-topk", type=int, default=0,
                   help="also time AVG + embedding rerank of this many candidates (the whole pipeline; 0: off)")
    p.add_argument("--rerank-weight", type=float, default=0.0,
                   help="weight of the retriever's score in the embedding rerank (the rerank_embed stage's chosen weight)")
    p.add_argument("--lm-reranker-dir", default=None,
                   help="also time AVG + this trained LM reranker (finetune_reranker's out-dir/best) on the top "
                        "--rerank-topk; timed at the gallery sizes whose images all have its inputs (the real ones)")
    p.add_argument("--ann", default="ivf_flat,ivf_pq,hnsw",
                   help="approximate-index baselines over the same features (avg.experiments.ann; needs faiss-cpu; '' for none)")
    p.add_argument("--ann-nlist", type=int, default=0, help="IVF lists (0: 4 sqrt(gallery), at most gallery / 39)")
    p.add_argument("--ann-pq-bytes", type=int, default=0, help="IVF-PQ bytes per vector (0: dim / 8)")
    p.add_argument("--ann-hnsw-m", type=int, default=32, help="HNSW links per node")
    p.add_argument("--no-curves", action="store_true",
                   help="time each system at its default knob only (no recall-throughput sweep)")
    p.add_argument("--curve-max-seconds", type=float, default=3.0, help="time box of one sweep point (timed seconds)")
    p.add_argument("--sweep", action="append", default=[], metavar="SYSTEM=V1,V2,...",
                   help="knob values of one system's curve, e.g. hnsw=16,64,256 or avg=10,20 (repeatable)")
    p.add_argument("--clip-backend", default=None, help="override the CLIP backend recorded in prepare_emb/index.json")
    p.add_argument("--clip-model", default=None, help="override the CLIP model recorded in prepare_emb/index.json")
    p.add_argument("--clip-pretrained", default=None, help="override the CLIP checkpoint/tag recorded in prepare_emb/index.json")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the query sample and the synthetic gallery")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from avg.core.stages import add_force_arg

    add_force_arg(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from avg.models.clip import load_clip, resolve_device
    from avg.retriever.t5 import load_t5_retriever
    from avg.core.stages import begin_stage, skip_if_done
    from avg.core.tracking import RunLogger

    args = build_parser().parse_args(argv)
    try:
        sizes = [int(s) for s in args.gallery_sizes.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--gallery-sizes {args.gallery_sizes!r}: expected comma-separated integers") from None
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    bad = [s for s in precisions if s not in ("fp32", "fp16")]
    if bad or not sizes or min(sizes) < 1:
        raise InputError(f"bad --precisions {bad} or --gallery-sizes {args.gallery_sizes!r}")
    if args.lm_reranker_dir and not args.rerank_topk:
        raise InputError("--lm-reranker-dir reranks the top --rerank-topk candidates: pass --rerank-topk K")
    for d in (args.retriever_dir, args.emb_dir, args.codes_dir, *([args.lm_reranker_dir] if args.lm_reranker_dir else [])):
        if not Path(d).is_dir():
            raise InputError(f"{d}: directory not found")
    lm_store = None
    if args.lm_reranker_dir:  # the reranker and its features checked before the stage writes anything
        from avg.reranker.step import LmRerankStep

        lm_store = LmRerankStep.check(args.lm_reranker_dir, args.emb_dir)
    out_dir = Path(args.out_dir)
    run = begin_stage(out_dir, "efficiency", vars(args), inputs=[args.retriever_dir, args.emb_dir, args.codes_dir,
                                                                 args.lm_reranker_dir],
                      force=args.force, ignore=("threads", "no_progress"))
    if run.up_to_date and skip_if_done():
        return run.previous.get("summary") or {}
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    device = resolve_device(args.device)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    real = load_real_gallery(args.emb_dir, args.codes_dir, args.split)
    emb = real.pop("emb")
    queries = sample_queries(emb, args.split, args.num_queries, args.seed)
    enc = emb.index["encoder"]
    encoder = load_clip(args.clip_backend or enc["backend"], args.clip_model or enc["model"],
                        args.clip_pretrained if args.clip_pretrained is not None else enc.get("pretrained"),
                        device=str(device), normalize=True)
    retriever = load_t5_retriever(args.retriever_dir, device)
    model, vocab = retriever.model, retriever.vocab
    if vocab.code_len != real["codes"].shape[1]:
        raise InputError(f"{args.codes_dir}/codes.json: codes have length {real['codes'].shape[1]}, "
                         f"{args.retriever_dir}/voken_vocab.json expects {vocab.code_len}")
    kw = dict(num_beams=args.num_beams, score_eos=not args.no_eos_score, fast_search=args.fast_search, text_encoder=encoder,
              dtype=retriever_dtype(args.retriever_dtype, device))
    systems = [GenerativeSystem(retriever, device, **kw)]
    if args.rerank_topk:
        systems.append(GenerativeSystem(retriever, device, rerank_k=args.rerank_topk, rerank_weight=args.rerank_weight, **kw))
    if args.lm_reranker_dir:
        step = LmRerankStep.load(args.lm_reranker_dir, device=device, emb_dir=args.emb_dir, store=lm_store,
                                 dtype=retriever_dtype(args.retriever_dtype, device))
        systems.append(GenerativeSystem(retriever, device, rerank_k=args.rerank_topk, lm_step=step, **kw))
    systems += [TwoTowerSystem(encoder, device, k=args.num_beams, precision=p) for p in precisions]
    from avg.experiments.ann import KINDS

    kinds = [k.strip() for k in args.ann.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise InputError(f"--ann {args.ann!r}: unknown index {bad[0]!r} (expected {', '.join(KINDS)})")
    sweep = parse_sweep(args.sweep)
    systems += [AnnSystem(encoder, device, k, k=args.num_beams, sweep=sweep.get(k), nlist=args.ann_nlist or None,
                          pq_bytes=args.ann_pq_bytes or None, hnsw_m=args.ann_hnsw_m, seed=args.seed) for k in kinds]
    info = device_description(device)
    logger = RunLogger(out_dir, run_name="efficiency", config=vars(args), log_name="efficiency.log")
    try:
        logger.info("device %s; %d queries; real images %d (%d in %s); sizes %s", info["name"], len(queries),
                    len(real["image_ids"]), real["first"], args.split, sizes)
        rows = benchmark(systems, real, queries, sizes, batch_size=args.batch_size, max_seconds=args.max_seconds,
                         warmup=args.warmup, noise_std=args.noise_std, seed=args.seed, device=device,
                         progress=not args.no_progress, log=lambda m, s: logger.log(m, step=s),
                         curves=not args.no_curves, curve_max_seconds=args.curve_max_seconds, sweep=sweep)
        model_mb = {"avg": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
                    "clip": sum(p.numel() * p.element_size() for p in encoder.model.parameters()) / 2**20}
        if args.lm_reranker_dir:
            model_mb["lm_reranker"] = sum(p.numel() * p.element_size() for p in step.reranker.parameters()) / 2**20
            skipped = [n for n in sizes if not any(r["system"] == "avg+lm_rerank" and r["gallery_size"] == n for r in rows)]
            if skipped:
                logger.info("avg+lm_rerank not timed at %s: synthetic images have no image tokens or grids for the "
                            "reranker (its cost per query depends on the depth reranked, not on the gallery)", skipped)
        config = {**{k: v for k, v in vars(args).items()}, "gallery_sizes": sizes, "model_mb": model_mb,
                  "num_real_images": len(real["image_ids"]), "dim": int(real["features"].shape[1])}
        paths = write_outputs(rows, out_dir, config, info)
        for r in rows:
            logger.info("%8d %-16s %-6s %-9s %7.1f q/s  %8.2f ms  R@10 %5.1f  %8.2f MB%s%s", r["gallery_size"], r["system"],
                        r["mode"], f"{r['knob']}={r['knob_value']}" if r["knob"] else "", r["queries_per_s"],
                        r["latency_ms"], r["R@10"], r["structure_mb"], "  (time-boxed)" if r["time_boxed"] else "",
                        "  pareto" if r.get("pareto") else "")
        _log_wandb_extras(logger, rows, paths["png"])
        summary = {f"{r['system']}/{r['mode']}/{r['gallery_size']}/queries_per_s": r["queries_per_s"]
                   for r in rows if r["default_knob"]}
        logger.summary(summary)
    finally:
        logger.finish()
    run.complete(summary={"rows": len(rows), "device": info["name"]})
    return {"rows": rows, "paths": paths}


def _log_wandb_extras(logger, rows: list[dict], png: str) -> None:
    """The table and the plot as wandb objects (no-op without a wandb run)."""
    wb = getattr(logger, "wandb_run", None)
    if wb is None:
        return
    import wandb

    table = wandb.Table(columns=CSV_COLUMNS, data=[[r.get(c) for c in CSV_COLUMNS] for r in rows])
    wb.log({"efficiency/table": table, "efficiency/plot": wandb.Image(png)})


if __name__ == "__main__":
    from avg.core.cli import run_main

    run_main(main)
