"""Plots the report and the efficiency benchmark draw (matplotlib, headless), each written atomically
as a PNG. Library code: it reads data frames handed to it and never the output folders."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import pandas as pd

from avg.core.io import atomic_open


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_throughput(df: pd.DataFrame, path: Path, title: str = "") -> Optional[Path]:
    """Queries/s against gallery size (log-log), one line per system x mode; hollow = time-boxed."""
    if df is None or df.empty or not {"gallery_size", "system", "mode", "queries_per_s"} <= set(df.columns):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = {s: f"C{i}" for i, s in enumerate(sorted(df["system"].unique()))}
    for (system, mode), d in df.groupby(["system", "mode"], sort=True):
        d = d.sort_values("gallery_size")
        bs = int(d["batch_size"].iloc[0]) if "batch_size" in d else None
        label = f"{system}, batch {bs}" if bs else f"{system} {mode}"
        line, = ax.plot(d["gallery_size"], d["queries_per_s"], "-" if mode == "batch" else "--", marker="o",
                        color=colours[system], label=label)
        if "time_boxed" in d:
            boxed = d[d["time_boxed"].astype(str).str.lower() == "true"]
            if len(boxed):
                ax.plot(boxed["gallery_size"], boxed["queries_per_s"], "o", mfc="white", mec=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gallery size (images)")
    ax.set_ylabel("queries / s")
    ax.set_title(title or "Throughput vs gallery size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_png(fig, path)


def plot_curves(df, path: Path, title: str = "") -> Optional[Path]:
    """Recall (``curve_recall``: R@10 of the gold on real galleries, recall of exact search's top 10 on
    synthetic ones) against batched queries/s, one panel per gallery size, one line per system through
    its knob values (labelled); points on the Pareto front drawn filled, the others hollow."""
    if df is None or df.empty or "knob_value" not in df:
        return None
    d = df[df["mode"] == "batch"]
    sizes = sorted(d["gallery_size"].unique())
    if not sizes:
        return None
    plt = pyplot()
    cols = min(3, len(sizes))
    rows_n = math.ceil(len(sizes) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 4.0 * rows_n), squeeze=False)
    colours = {s: f"C{i}" for i, s in enumerate(sorted(d["system"].unique()))}
    for ax, size in zip(axes.flat, sizes):
        for system, part in d[d["gallery_size"] == size].groupby("system", sort=True):
            part = part.sort_values("queries_per_s")
            c = colours[system]
            y = pd.to_numeric(part["curve_recall"] if "curve_recall" in part else part["R@10"], errors="coerce")
            if y.isna().all():  # throughput only (see add_curve_recall)
                for x, v in zip(part["queries_per_s"], part["knob_value"]):
                    ax.axvline(x, ls=":", color=c, alpha=0.7)
                    ax.annotate(f"{int(v)}", (x, 0.98), xycoords=("data", "axes fraction"), fontsize=6, color=c)
                ax.plot([], [], ":", color=c, label=f"{system} (queries/s only)")
                continue
            ax.plot(part["queries_per_s"], y, "-", color=c, label=system, alpha=0.8)
            front = (part["pareto"].astype(str).str.lower() == "true") if "pareto" in part else (y < 0)
            ax.plot(part[front]["queries_per_s"], y[front], "o", color=c)
            ax.plot(part[~front]["queries_per_s"], y[~front], "o", mfc="white", mec=c)
            for (_, r), yy in zip(part.iterrows(), y):
                if r.get("knob_value") is not None and not (isinstance(r["knob_value"], float) and math.isnan(r["knob_value"])):
                    ax.annotate(f"{int(r['knob_value'])}", (r["queries_per_s"], yy), fontsize=6,
                                textcoords="offset points", xytext=(3, 3), color=c)
        real = bool((d[d["gallery_size"] == size]["num_real"].astype(int) >= int(size)).all())
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # decade labels only: the minor ones overlap
        ax.set_xlabel("queries / s (batched)")
        ax.set_ylabel("R@10 (gold image)" if real else "recall of exact search's top 10 (%)")
        ax.set_title(f"{int(size):,} images" + ("" if real else " (synthetic beyond the real ones)"), fontsize=10)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(sizes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle((title + "\n" if title else "") + "recall vs throughput (knob values labelled; filled = Pareto front)",
                 fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


__all__ = ["pyplot", "save_png", "plot_throughput", "plot_curves"]
