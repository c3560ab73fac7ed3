"""Collect every metrics file under an output dir into one results table.

``python -m avg.eval.report outputs/demo`` prints a markdown table (system, split, R@1/5/10, mean
rank, queries) and writes ``results.csv`` / ``results.md`` next to it. A metrics file is any
``metrics*.json`` holding ``R@1``; its system name is its ``system`` key when present, else its
path relative to the output dir. Code statistics from ``codes/stats.json`` are shown below.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import pandas as pd

from avg.utils.io import atomic_open

COLUMNS = ["system", "split", "R@1", "R@5", "R@10", "mean_rank", "num_queries", "file"]


def collect_metrics(root: str | Path) -> pd.DataFrame:
    root = Path(root)
    rows = []
    for path in sorted(root.rglob("metrics*.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # temp dirs of an interrupted stage
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(m, dict) or "R@1" not in m:
            continue
        rel = path.relative_to(root)
        rows.append({
            "system": m.get("system") or str(rel.parent if str(rel.parent) != "." else rel.stem),
            "split": m.get("split", ""),
            "R@1": m.get("R@1"), "R@5": m.get("R@5"), "R@10": m.get("R@10"),
            "mean_rank": m.get("mean_rank"), "num_queries": m.get("num_queries"),
            "file": str(rel),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def to_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no metrics files found)"
    shown = df.drop(columns=["file"])
    header = "| " + " | ".join(shown.columns) + " |"
    sep = "|" + "|".join("---" for _ in shown.columns) + "|"
    lines = [header, sep]
    for _, r in shown.iterrows():
        cells = []
        for c in shown.columns:
            v = r[c]
            if v is None or (isinstance(v, float) and v != v):
                cells.append("")
            elif c == "num_queries":
                cells.append(str(int(v)))
            elif isinstance(v, float):
                cells.append(f"{v:.2f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def code_stats_lines(root: Path) -> list[str]:
    stats_path = root / "codes" / "stats.json"
    if not stats_path.is_file():
        return []
    s = json.loads(stats_path.read_text(encoding="utf-8"))
    keys = ["num_images", "code_len", "raw_collision_rate", "final_collision_rate", "largest_group"]
    shown = ", ".join(f"{k}={s[k]:.4g}" if isinstance(s.get(k), float) else f"{k}={s.get(k)}" for k in keys if k in s)
    return [f"codes: {shown}"]


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description="Collect metrics files of an output dir into one table")
    p.add_argument("root", help="output dir of one dataset, e.g. outputs/demo")
    p.add_argument("--no-save", action="store_true", help="print only; do not write results.csv/results.md")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: {root}: no such output directory", file=sys.stderr)
        return 2
    df = collect_metrics(root)
    md = to_markdown(df)
    extra = code_stats_lines(root)
    print(md)
    for line in extra:
        print(line)
    if not args.no_save and not df.empty:
        with atomic_open(root / "results.csv") as f:
            df.to_csv(f, index=False)
        with atomic_open(root / "results.md") as f:
            f.write(md + "\n" + "".join(f"\n{x}\n" for x in extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
