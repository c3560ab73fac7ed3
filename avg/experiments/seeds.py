"""Mean ± std over seeds of every system's metrics: the table a recall claim is made from.

    python -m avg.experiments.seeds outputs/seeds --dataset demo --seeds 0 1 2

Reads each seed's output root ``<seeds_dir>/seed_<s>/<dataset>/`` (written by ``scripts/run_seeds.sh``)
with the report's collector (avg.experiments.report: one row per metrics file), groups the rows by
(system, stage, split) and writes ``<seeds_dir>/<dataset>/results_seeds.{md,csv}``: the number of
seeds, mean ± sample std (ddof 1) of R@1/5/10/20 and of the list recall of rerankers, and the
per-seed R@1. Below the table, paired differences of R@1 over the same seeds (stage 2 − stage 1,
each reranker − the list it reordered), mean ± std: a difference counts only when it exceeds its
spread. A reranker that no pair above covers is paired with the retriever order of the lists it
reordered (the ``<retriever>_top<k>`` metrics file its test stage writes beside its own).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from avg.artifacts.registry import T5_STAGES, out as stage_out
from avg.reranker.embed import embed_rerank_system
from avg.experiments.report import collect_metrics
from avg.core.io import InputError, atomic_open

METRICS = ("R@1", "R@5", "R@10", "R@20")
# (name, system/stage of the minuend, of the subtrahend): paired differences reported when both exist
_T5_1, _T5_2 = stage_out(T5_STAGES[1]), stage_out(T5_STAGES[2])
PAIRS = (("stage 2 − stage 1", ("avg_t5_stage2", _T5_2), ("avg_t5_stage1", _T5_1)),
         # the embedding rerank is named after the retriever it reranks (RERANK_RETRIEVER, by default stage 2)
         ("embedding rerank − its input", (embed_rerank_system(_T5_2), stage_out("rerank_embed")),
          ("avg_t5_stage2", _T5_2)),
         ("LM reranker − its input", ("avg_reranker", stage_out("test_reranker_llama")), ("avg_t5_stage2", _T5_2)),
         # the control: the same reranker over the two-tower's own top-k (prepare_reranker_dataset --control)
         ("AVG + reranker − two-tower + the same reranker", ("avg_reranker", stage_out("test_reranker_llama")),
          ("clip_two_tower+reranker", stage_out("test_reranker_llama"))),
         ("two-tower + reranker − two-tower", ("clip_two_tower+reranker", stage_out("test_reranker_llama")),
          ("clip_two_tower", stage_out("eval_clip_baseline"))),
         ("AVG stage 2 − two-tower", ("avg_t5_stage2", _T5_2), ("clip_two_tower", stage_out("eval_clip_baseline"))))


def collect(seeds_dir: str | Path, dataset: str, seeds: Sequence[str]) -> pd.DataFrame:
    """One row per (seed, metrics file)."""
    frames = []
    for s in seeds:
        root = Path(seeds_dir) / f"seed_{s}" / dataset
        if not root.is_dir():
            raise InputError(f"{root}: no outputs for seed {s} (run scripts/run_seeds.sh)")
        df = collect_metrics(root)
        df.insert(0, "seed", str(s))
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _list_recall(v) -> Optional[float]:
    if v is None or (isinstance(v, float) and v != v):
        return None
    return float(str(v).split()[0])


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """mean/std per (system, stage, split) over seeds."""
    rows = []
    df = df.assign(list_recall=df["list_R@k"].map(_list_recall) if "list_R@k" in df else None)
    for (system, stage, split), g in df.groupby(["system", "stage", "split"], sort=False):
        row = {"system": system, "stage": stage, "split": split, "seeds": int(g["seed"].nunique())}
        for m in (*METRICS, "list_recall"):
            vals = pd.to_numeric(g[m], errors="coerce").dropna().to_numpy(dtype=float) if m in g else np.array([])
            row[f"{m} mean"] = float(vals.mean()) if len(vals) else None
            row[f"{m} std"] = float(vals.std(ddof=1)) if len(vals) > 1 else (0.0 if len(vals) else None)
        row["R@1 per seed"] = " ".join(f"{v:.2f}" for v in pd.to_numeric(g["R@1"], errors="coerce"))
        rows.append(row)
    return pd.DataFrame(rows)


def _list_order_pairs(d: pd.DataFrame) -> list:
    """(name, minuend, subtrahend) for each reranker against the retriever order of the very lists it
    reordered: the ``<retriever>_top<k>`` file its test stage writes next to its own."""
    out = []
    for stage in dict.fromkeys(d["stage"]):
        systems = list(dict.fromkeys(d.loc[d["stage"] == stage, "system"]))
        orders = [x for x in systems if re.search(r"_top\d+$", str(x))]
        for x in (x for x in systems if x not in orders):
            # the control (<system>+reranker) reordered <system>_top<k>; the reranker of the retriever the other order
            own = [o for o in orders if str(x).endswith("+reranker") and str(o).startswith(str(x)[:-len("+reranker")] + "_top")]
            rest = [o for o in orders if not any(str(o).startswith(str(y)[:-len("+reranker")] + "_top")
                                                 for y in systems if str(y).endswith("+reranker"))]
            match = own or (rest if not str(x).endswith("+reranker") else [])
            if len(match) == 1:
                out.append((f"{x} − its list order ({stage})", (x, stage), (match[0], stage)))
    return out


def paired_differences(df: pd.DataFrame, split: str = "test") -> list[dict]:
    """R@1 differences over the seeds that have both systems (PAIRS, then each reranker not yet
    paired against the retriever order of the lists it reordered)."""
    out = []
    d = df[df["split"] == split]
    done = set()  # a reranker already paired with its input by PAIRS is not paired again with its list order
    for name, (sys_a, stage_a), (sys_b, stage_b) in (*PAIRS, *_list_order_pairs(d)):
        if (sys_a, stage_a) in done:
            continue
        a = d[(d["system"] == sys_a) & (d["stage"] == stage_a)].set_index("seed")["R@1"]
        b = d[(d["system"] == sys_b) & (d["stage"] == stage_b)].set_index("seed")["R@1"]
        common = sorted(set(a.index) & set(b.index))
        if not common:
            continue
        diff = np.array([float(a[s]) - float(b[s]) for s in common])
        done.add((sys_a, stage_a))
        out.append({"pair": name, "seeds": len(common), "mean": float(diff.mean()),
                    "std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                    "per_seed": " ".join(f"{x:+.2f}" for x in diff)})
    return out


def to_markdown(summary: pd.DataFrame, pairs: list[dict]) -> str:
    def pm(r, m):
        mean, std = r.get(f"{m} mean"), r.get(f"{m} std")
        return "" if mean is None or mean != mean else f"{mean:.2f} ± {std:.2f}"

    lines = ["| system | stage | split | seeds | R@1 | R@5 | R@10 | R@20 | list recall | R@1 per seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        lines.append(f"| {r['system']} | {r['stage']} | {r['split']} | {r['seeds']} | " +
                     " | ".join(pm(r, m) for m in (*METRICS, "list_recall")) + f" | {r['R@1 per seed']} |")
    if pairs:
        lines += ["", "Paired R@1 differences over the same seeds (test):", "", "| pair | seeds | mean ± std | per seed |",
                  "|---|---|---|---|"]
        lines += [f"| {p['pair']} | {p['seeds']} | {p['mean']:+.2f} ± {p['std']:.2f} | {p['per_seed']} |" for p in pairs]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Mean ± std over seeds of every system's metrics")
    p.add_argument("seeds_dir", help="folder holding seed_<s>/<dataset>/ (scripts/run_seeds.sh writes ${OUT_DIR}/seeds)")
    p.add_argument("--dataset", default="demo", help="dataset name (the folder under each seed root)")
    p.add_argument("--seeds", nargs="+", required=True, help="the seeds to aggregate")
    args = p.parse_args(argv)
    try:
        df = collect(args.seeds_dir, args.dataset, args.seeds)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if df.empty:
        print("error: no metrics files found", file=sys.stderr)
        return 2
    summary = summarize(df)
    pairs = paired_differences(df)
    md = to_markdown(summary, pairs)
    print(md)
    out = Path(args.seeds_dir) / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "results_seeds.csv") as f:
        summary.to_csv(f, index=False)
    with atomic_open(out / "results_seeds_per_seed.csv") as f:
        df.to_csv(f, index=False)
    with atomic_open(out / "results_seeds.md") as f:
        f.write(f"Seeds: {' '.join(args.seeds)}\n\n{md}\n")
    print(f"wrote {out / 'results_seeds.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
