"""Collect every metrics file under an output dir into one results table, plus plots.

``python -m avg.experiments.report outputs/demo`` prints a markdown table and writes ``results.csv`` /
``results.md`` next to it. A metrics file is any ``metrics*.json`` holding ``R@1``; its system
name is its ``system`` key when present, else its path relative to the output dir. Columns:

* ``stage``: the folder holding the file, relative to the output dir, without a trailing ``eval``;
* ``collision_rate``: for generative systems (every system whose name does not start with
  ``clip``), the raw collision rate of the evaluated split's codes from the nearest
  ``generate_codes/stats.json`` (looked for next to the file's folder, then each parent up to the output
  dir), the whole-set rate when the split has none;
* ``queries_per_s``: the file's ``queries_per_s`` when its evaluation was timed;
* ``list_R@k``: for a reranker, the recall of the list it reordered (its ceiling);
* ``setting``: what distinguishes the run (code score, query-feature prefix, beam, fusion weights).

Below the table: the tokenizer's retrieval ceiling (``generate_codes/stats.json``: captions ranked against
the decoded codes and the raw image features) and, for every retriever run that wrote
``diagnostics`` into its metrics, where the gold code is lost (gold-is-top rate per position given
the gold prefix, the first position where the top code differs, R@1 of images alone on their code
vs sharing it, and the fit: R@1 on a train chunk as large as the val gallery next to val).

Plots go to ``<root>/plots/`` (matplotlib, Agg; a plot is skipped quietly when its data is
absent): ``recall_vs_beam.png`` (metrics files with ``num_beams`` grouped by study, or system,
and split; groups with at least two beam sizes; several files at one beam size are averaged),
``throughput_vs_gallery.png`` (``efficiency/efficiency.csv``) and ``training_curves.png``
(``train/loss`` and ``eval/val/R@1`` against step from every stage's ``metrics.jsonl``).
Code statistics from ``generate_codes/stats.json`` are printed below the table.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from pathlib import Path
from typing import Optional

import pandas as pd

from avg.artifacts.registry import out as stage_out
from avg.experiments.plots import plot_throughput, pyplot, save_png
from avg.core.io import InputError, atomic_open

COLUMNS = ["system", "split", "R@1", "R@5", "R@10", "R@20", "mean_rank", "num_queries", "list_R@k",
           "collision_rate", "queries_per_s", "setting", "stage", "file"]
PLOTS = ("recall_vs_beam.png", "throughput_vs_gallery.png", "training_curves.png")


def _visible(path: Path, root: Path) -> bool:
    """False for files under hidden dirs (temp dirs of an interrupted stage) or wandb's run dirs."""
    return not any(part.startswith(".") or part == "wandb" for part in path.relative_to(root).parts)


def _stage_of(rel: Path) -> str:
    parts = list(rel.parent.parts)
    if parts and parts[-1] == "eval":
        parts = parts[:-1]
    return "/".join(parts) or "."


def find_files(root: Path, pattern: str) -> list[Path]:
    """Files named like ``pattern`` under ``root``, sorted, following linked folders (the seed runners
    link the shared CLIP baseline into every seed's folder) but never the same real folder twice."""
    seen, out = set(), []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        out += [Path(dirpath) / f for f in filenames if fnmatch.fnmatch(f, pattern)]
    return sorted(out)


def _is_generative(system: str) -> bool:
    return not str(system).lower().startswith("clip")


def nearest_code_stats(path: Path, root: Path) -> Optional[dict]:
    """``generate_codes/stats.json`` next to `path`'s folder or one of its parents up to `root`."""
    d = path.parent
    while True:
        stats = d / stage_out("generate_codes") / "stats.json"
        if stats.is_file():
            try:
                return json.loads(stats.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
        if d == root or root not in d.parents:
            return None
        d = d.parent


def collision_rate(stats: Optional[dict], split: str) -> Optional[float]:
    if not stats:
        return None
    per_split = (stats.get("splits") or {}).get(split) or {}
    value = per_split.get("collision_rate", stats.get("raw_collision_rate"))
    return float(value) if value is not None else None


def _read_metrics(root: Path, *, grid: bool = False) -> list[tuple[Path, dict]]:
    """Metrics files under ``root``; the experiment grid's (under ``grid/``) only when ``grid``:
    they have their own per-study tables (avg.experiments.grid) and would crowd the main one."""
    out = []
    for path in find_files(root, "metrics*.json"):
        if not _visible(path, root):
            continue
        if not grid and "grid" in path.relative_to(root).parts[:-1]:
            continue
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(m, dict) and "R@1" in m:
            out.append((path, m))
    return out


def collect_metrics(root: str | Path, *, grid: bool = False) -> pd.DataFrame:
    """One row per system and split (:func:`one_row_per_system`); with ``grid=True`` one row per metrics file,
    the experiment grid's included."""
    root = Path(root)
    rows = []
    for path, m in _read_metrics(root, grid=grid):
        rel = path.relative_to(root)
        system = m.get("system") or str(rel.parent if str(rel.parent) != "." else rel.stem)
        split = m.get("split", "")
        rate = collision_rate(nearest_code_stats(path, root), split) if _is_generative(system) else None
        rows.append({
            "system": system, "split": split,
            "R@1": m.get("R@1"), "R@5": m.get("R@5"), "R@10": m.get("R@10"), "R@20": m.get("R@20"),
            "mean_rank": m.get("mean_rank"), "num_queries": m.get("num_queries"),
            "list_R@k": f"{float(m['list_recall']):.2f} (k={m.get('topk')})" if m.get("list_recall") is not None else None,
            "collision_rate": rate, "queries_per_s": m.get("queries_per_s"), "setting": setting_of(m),
            "stage": _stage_of(rel), "file": str(rel),
        })
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df if grid else one_row_per_system(df)  # the grid's variants share system names


def one_row_per_system(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (system, split): where two files report the same system on the same split (the LLaMA
    trainer's own test of ``best/`` and ``test_retriever_llama``'s), the later stage in pipeline order
    keeps its row; ``df.attrs["duplicates"]`` lists the files left out."""
    from avg.artifacts.registry import names

    order = {name: i for i, name in enumerate(names())}
    rank = df["stage"].map(lambda st: order.get(str(st).split("/")[0], -1))
    kept = df.assign(_rank=rank).sort_values("_rank", kind="stable")
    dup = kept.duplicated(subset=["system", "split"], keep="last")
    out = kept[~dup].sort_index().drop(columns="_rank")
    out.attrs["duplicates"] = kept.loc[dup, "file"].tolist()
    return out


def setting_of(m: dict) -> str:
    """A short description of what distinguishes a run, from the keys its metrics file records."""
    parts = []
    if m.get("score"):
        parts.append(f"score={m['score']}")
    if m.get("query_prefix"):
        parts.append(f"query prefix {m['query_prefix']}")
    if m.get("num_beams"):
        parts.append(f"beam {m['num_beams']}")
    if m.get("fusion_weight") is not None:
        parts.append(f"w_ret={float(m['fusion_weight']):.3g}")
    if m.get("embed_weight"):
        parts.append(f"u_cos={float(m['embed_weight']):.3g}")
    if m.get("late_interaction"):
        parts.append("late interaction")
    if m.get("image_prefix"):
        parts.append(f"image prefix {m['image_prefix']}")
    return ", ".join(parts)


def diagnostics_lines(root: Path) -> list[str]:
    """Markdown: the tokenizer ceiling and each retriever's diagnostics (module docstring)."""
    lines = []
    stats_path = root / stage_out("generate_codes") / "stats.json"
    ceiling = (json.loads(stats_path.read_text(encoding="utf-8")).get("ceiling") or {}) if stats_path.is_file() else {}
    if ceiling:
        lines += ["", "Tokenizer ceiling (captions ranked against the decoded codes / the raw image features):", "",
                  "| split | decoded codes R@1 / R@5 / R@10 / R@20 | image features R@1 / R@5 / R@10 / R@20 |", "|---|---|---|"]
        for split, c in sorted(ceiling.items()):
            fmt = lambda d: " / ".join(f"{d.get(f'R@{k}', float('nan')):.2f}" for k in (1, 5, 10, 20))  # noqa: E731
            lines.append(f"| {split} | {fmt(c.get('decoded_codes', {}))} | {fmt(c.get('image_features', {}))} |")
        tops = [(split, c) for split, c in sorted(ceiling.items()) if "gold_is_top" in c.get("image_features", {})]
        if tops:
            lines += ["", "The two-tower given the gold prefix: how often the best-scored image under it carries the "
                          "gold voken, per position (%; compare the retrievers' 'gold is top' below):", "",
                      "| split | decoded codes | image features |", "|---|---|---|"]
            for split, c in tops:
                per = lambda d: " / ".join(f"{x:.1f}" for x in d.get("gold_is_top", []))  # noqa: E731
                lines.append(f"| {split} | {per(c.get('decoded_codes', {}))} | {per(c['image_features'])} |")
    diag = [(p, m) for p, m in _read_metrics(root) if isinstance(m.get("diagnostics"), dict)]
    if diag:
        lines += ["", "Where the gold code is lost (test): gold voken top among the allowed continuations, given the gold "
                      "prefix, per position | code R@1 when the first t vokens are given right, t = 1 .. L-1 (a "
                      "seeded sample of queries) | first position where the top code differs | R@1 alone on its code / "
                      "sharing it | fit: R@1 train chunk / val", "",
                  "| system | gold is top (%) | code R@1 given t vokens (%) | first miss (% of queries) | "
                  "R@1 unique / shared code | R@1 train / val |",
                  "|---|---|---|---|---|---|"]
        for path, m in diag:
            d = m["diagnostics"]
            top = " / ".join(f"{p['gold_is_top']:.1f}" for p in d.get("positions", []))
            miss = ", ".join(f"{k}: {v:.1f}" for k, v in (d.get("first_miss") or {}).items())
            fit = d.get("fit") or {}
            fit_s = f"{fit.get('train', {}).get('R@1', float('nan')):.2f} / {fit.get('val', {}).get('R@1', float('nan')):.2f}"
            uq = f"{d.get('r1_unique_code')} / {d.get('r1_shared_code')} ({d.get('queries_shared_code')} q shared)"
            given = " / ".join(f"{g['code_r1']:.1f}" for g in d.get("given_prefix", [])) or "-"
            lines.append(f"| {m.get('system', path.parent)} ({_stage_of(path.relative_to(root))}) | {top} | {given} | {miss} | "
                         f"{uq} | {fit_s} |")
    return lines


def _cell(c: str, v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if c == "num_queries":
        return str(int(v))
    if c == "collision_rate":
        return f"{100 * float(v):.1f}%"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def to_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no metrics files found)"
    shown = df.drop(columns=["file"])
    header = "| " + " | ".join(shown.columns) + " |"
    sep = "|" + "|".join("---" for _ in shown.columns) + "|"
    lines = [header, sep]
    for _, r in shown.iterrows():
        lines.append("| " + " | ".join(_cell(c, r[c]) for c in shown.columns) + " |")
    return "\n".join(lines)


def code_stats_lines(root: Path) -> list[str]:
    stats_path = root / stage_out("generate_codes") / "stats.json"
    if not stats_path.is_file():
        return []
    s = json.loads(stats_path.read_text(encoding="utf-8"))
    keys = ["num_images", "code_len", "raw_collision_rate", "final_collision_rate", "largest_group"]
    shown = ", ".join(f"{k}={s[k]:.4g}" if isinstance(s.get(k), float) else f"{k}={s.get(k)}" for k in keys if k in s)
    return [f"codes: {shown}"]


# ------------------------------------------------------------------------------------ plots
def plot_recall_vs_beam(root: Path, path: Path) -> Optional[Path]:
    """R@1/5/10 against beam size for every (study or system, split) with >= 2 beam sizes."""
    pts = []
    found = _read_metrics(root, grid=True)
    if any(m.get("study") for _, m in found):  # a grid exists: its summary files, not the stages' own copies
        found = [(p, m) for p, m in found if m.get("study")]
    for _, m in found:
        beams = m.get("num_beams", (m.get("search") or {}).get("num_beams") if isinstance(m.get("search"), dict) else None)
        if beams is None:
            continue
        group = f"{m.get('study') or m.get('system') or '?'} ({m.get('split', '')})"
        pts.append({"group": group, "num_beams": int(beams), **{k: m.get(k) for k in ("R@1", "R@5", "R@10")}})
    if not pts:
        return None
    df = pd.DataFrame(pts)
    groups = [g for g, d in df.groupby("group") if d["num_beams"].nunique() >= 2]
    if not groups:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for g in groups:
        d = df[df["group"] == g].groupby("num_beams")[["R@1", "R@5", "R@10"]].mean().sort_index()
        for k, style in (("R@1", "-o"), ("R@5", "--s"), ("R@10", ":^")):
            ax.plot(d.index, d[k], style, label=f"{g} {k}")
    ax.set_xlabel("beam size")
    ax.set_ylabel("recall (%)")
    ax.set_title("Recall vs beam size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_png(fig, path)


def plot_training_curves(root: Path, path: Path) -> Optional[Path]:
    """train/loss and eval/val/R@1 against step, one line per stage's metrics.jsonl."""
    curves: dict[str, dict[str, list]] = {}
    for f in find_files(root, "metrics.jsonl"):
        if not _visible(f, root):
            continue
        stage = _stage_of(f.relative_to(root))
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or rec.get("step") is None:
                continue
            for key in ("train/loss", "eval/val/R@1"):
                if isinstance(rec.get(key), (int, float)):
                    curves.setdefault(key, {}).setdefault(stage, []).append((rec["step"], rec[key]))
    if not curves:
        return None
    plt = pyplot()
    keys = [k for k in ("train/loss", "eval/val/R@1") if k in curves]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for stage, pts in sorted(curves[key].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 20 else None, ms=3, label=stage)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, path)


def make_plots(root: Path) -> list[Path]:
    """Every plot whose data exists, under ``<root>/plots/``."""
    out = root / "plots"
    made = [plot_recall_vs_beam(root, out / PLOTS[0])]
    eff = root / "efficiency" / "efficiency.csv"
    if eff.is_file():
        made.append(plot_throughput(pd.read_csv(eff), out / PLOTS[1]))
    made.append(plot_training_curves(root, out / PLOTS[2]))
    return [p for p in made if p is not None]


def write_results_page(root: Path, df: pd.DataFrame, plots: list, *, n: int, seed: int) -> Optional[Path]:
    """``results.html`` (avg.experiments.html_page) from the test run files under ``root``; None without any."""
    from avg.data.sample_tables import resolve_image_paths
    from avg.experiments.html_page import write_page

    if n <= 0:
        return None
    return write_page(root, df, _read_metrics(root), plots, resolve_image_paths(data_dir=str(root / stage_out("prepare_retriever_dataset"))),
                      n=n, seed=seed)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description="Collect metrics files of an output dir into one table, plus plots")
    p.add_argument("root", help="output dir of one dataset, e.g. outputs/demo")
    p.add_argument("--no-save", action="store_true", help="print only; do not write results.csv/results.md or plots")
    p.add_argument("--page-queries", type=int, default=12, help="test queries shown on results.html (0: no page)")
    p.add_argument("--page-seed", type=int, default=0, help="seed of the queries results.html shows")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: {root}: no such output directory", file=sys.stderr)
        return 2
    df = collect_metrics(root)
    md = to_markdown(df)
    extra = code_stats_lines(root) + diagnostics_lines(root)
    if df.attrs.get("duplicates"):
        extra.append("same system and split also reported by (a later stage's row is shown): "
                     + ", ".join(df.attrs["duplicates"]))
    print(md)
    for line in extra:
        print(line)
    if args.no_save:
        return 0
    plots = make_plots(root)
    for path in plots:
        print(f"plot: {path}")
    if not df.empty:
        with atomic_open(root / "results.csv") as f:
            df.to_csv(f, index=False)
        plot_lines = [f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in plots]
        try:
            page = write_results_page(root, df, plots, n=args.page_queries, seed=args.page_seed)
        except InputError as e:  # a malformed run file costs the page, not the table
            print(f"warning: results.html not written: {e}", file=sys.stderr)
            page = None
        if page is not None:
            print(f"page: {page}")
            plot_lines.insert(0, f"Results page (queries, gold images and each system's top 5): [{page.name}]({page.name})")
        with atomic_open(root / "results.md") as f:
            f.write(md + "\n\n" + "\n".join(extra) + "\n" + "".join(f"\n{x}\n" for x in plot_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
