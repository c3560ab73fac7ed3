"""A results page a person can look at: ``results.html`` beside ``results.md``.

For a seeded sample of test queries it shows the query, its gold image and, one row per system
(CLIP two-tower, AVG stage 1 / 2, each reranker), that system's top 5 with their scores; a hit is
framed in green. Above them: the metrics table and the report's plots. The page is one
self-contained file (thumbnails and plots embedded as data URIs): it opens from disk, is copied
or mailed as is, and needs no server. ``python -m avg.experiments.report`` writes it; this module only
reads run files (``run_*.jsonl`` beside each ``metrics_*.json``) and builds HTML.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from avg.artifacts.registry import T5_STAGES, out as stage_out
from avg.metrics import first_hit_rank, gold_set
from avg.reranker.embed import embed_rerank_system

PAGE = "results.html"
TOP = 5
# systems in the order a reader compares them; others follow by name
# the embedding rerank is named after its input, the retriever folder RERANK_RETRIEVER names (default: stage 2)
SYSTEM_ORDER = ("clip_two_tower", "avg_t5_stage1", "avg_t5_stage2", embed_rerank_system(stage_out(T5_STAGES[2])), "avg_reranker")


def run_file_of(metrics_path: Path) -> Optional[Path]:
    """``run_<x>.jsonl`` beside ``metrics_<x>.json`` (None when the stage wrote no run file)."""
    name = metrics_path.name
    if not (name.startswith("metrics") and name.endswith(".json")):
        return None
    run = metrics_path.with_name("run" + name[len("metrics"):-len(".json")] + ".jsonl")
    return run if run.is_file() else None


def system_runs(metrics: Sequence[tuple[Path, dict]], split: str = "test") -> list[tuple[str, Path, dict]]:
    """(system, run file, metrics) of every ``split`` metrics file that has a run file, in SYSTEM_ORDER."""
    out, seen = [], set()
    for path, m in metrics:
        run = run_file_of(path)
        system = str(m.get("system") or path.parent.name)
        if run is None or m.get("split", split) != split or system in seen:
            continue
        seen.add(system)
        out.append((system, run, m))
    rank = {s: i for i, s in enumerate(SYSTEM_ORDER)}
    return sorted(out, key=lambda t: (rank.get(t[0], len(rank)), t[0]))


def thumbnail_uri(path: Optional[str], size: int = 96) -> Optional[str]:
    """A JPEG data URI of the image at ``path`` fitted in ``size`` px, or None when it cannot be read."""
    from avg.data.sample_tables import thumbnail

    im = thumbnail(path, size)
    if im is None:
        return None
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_uri(path: Path) -> Optional[str]:
    """A data URI of a PNG file (the plots)."""
    try:
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError:
        return None


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} .muted{color:#5b6570;font-size:13px}
table.metrics{border-collapse:collapse;font-size:13px;margin:8px 0} .metrics th,.metrics td{border:1px solid #d5dae0;padding:4px 8px;text-align:right}
.metrics th{background:#eef1f5} .metrics td:first-child,.metrics th:first-child{text-align:left}
.plots img{max-width:520px;margin:4px 12px 4px 0;border:1px solid #d5dae0}
section.query{border:1px solid #d5dae0;border-radius:6px;padding:10px 12px;margin:14px 0}
.qtext{font-size:15px;font-weight:600;margin-bottom:6px} .gold{display:flex;align-items:center;gap:10px;margin-bottom:8px;font-size:13px}
table.results{border-collapse:collapse} .results td{padding:3px 6px;vertical-align:top;font-size:12px}
td.system{font-weight:600;width:210px;white-space:nowrap} .cand{display:inline-block;width:104px;text-align:center}
.cand img,.gold img,.missing{width:96px;height:96px;object-fit:contain;border:3px solid #e4e7eb;border-radius:4px;background:#f6f7f9}
.cand.hit img,.cand.hit .missing{border-color:#1a9b4b} .cand .score{color:#5b6570} .cand.hit .score{color:#1a9b4b;font-weight:700}
.missing{display:inline-flex;align-items:center;justify-content:center;font-size:10px;overflow:hidden;word-break:break-all}
.rank-note{font-size:12px;color:#5b6570}
"""


def _img(uri: Optional[str], image_id: str) -> str:
    if uri:
        return f'<img src="{uri}" alt="{html.escape(image_id)}" title="{html.escape(image_id)}">'
    return f'<span class="missing" title="{html.escape(image_id)}">{html.escape(image_id)}</span>'


def build_page(title: str, metrics_table: str, runs: Sequence[tuple[str, dict]], image_paths: dict, *,
               plots: Sequence[Path] = (), n: int = 12, seed: int = 0, top: int = TOP, thumb: int = 96) -> str:
    """The HTML of the page. ``runs``: (system, {query key: run record}) in display order; the
    sampled queries are ``n`` keys of the first system drawn with ``seed``."""
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    parts.append(f'<p class="muted">{len(runs)} systems; {min(n, len(runs[0][1])) if runs else 0} test queries drawn '
                 f'with seed {seed}; top {top} per system, the gold image framed in green.</p>')
    parts.append("<h2>Metrics</h2>" + metrics_table)
    uris = [(p, file_uri(p)) for p in plots]
    if any(u for _, u in uris):
        parts.append('<h2>Plots</h2><div class="plots">' + "".join(
            f'<img src="{u}" alt="{html.escape(p.stem)}" title="{html.escape(p.stem)}">' for p, u in uris if u) + "</div>")
    cache: dict = {}

    def thumb_of(image_id: str) -> str:
        if image_id not in cache:
            cache[image_id] = _img(thumbnail_uri(image_paths.get(image_id), thumb), image_id)
        return cache[image_id]

    parts.append("<h2>Queries</h2>")
    if runs:
        keys = list(runs[0][1])
        pick = sorted(np.random.default_rng([seed, 17]).choice(len(keys), min(n, len(keys)), replace=False).tolist())
        for qn, i in enumerate(pick, 1):
            key = keys[i]
            first = runs[0][1][key]
            gold = gold_set(first["gold"])
            parts.append(f'<section class="query" id="q{qn}"><div class="qtext">{qn}. {html.escape(first["query"])}</div>')
            parts.append('<div class="gold">gold: ' + "".join(thumb_of(g) for g in sorted(gold)) +
                         f' <span>{html.escape(", ".join(sorted(gold)))}</span></div><table class="results">')
            for system, records in runs:
                rec = records.get(key)
                parts.append(f'<tr class="result" data-system="{html.escape(system)}"><td class="system">{html.escape(system)}')
                if rec is None:
                    parts.append('<div class="rank-note">not evaluated on this query</div></td><td></td></tr>')
                    continue
                ranked = [str(x) for x in rec.get("ranked") or []]
                scores = list(rec.get("scores") or [None] * len(ranked))
                where = first_hit_rank(ranked, gold)  # the rank the metrics count
                note = f"gold at rank {where}" if where else f"gold not in its {len(ranked)}"
                parts.append(f'<div class="rank-note">{note}</div></td><td>')
                for r, (x, s) in enumerate(zip(ranked[:top], scores[:top]), 1):
                    score = "" if s is None else f"{float(s):.3f}"
                    parts.append(f'<span class="cand{" hit" if x in gold else ""}">{thumb_of(x)}'
                                 f'<br><span class="score">#{r} {score}</span></span>')
                parts.append("</td></tr>")
            parts.append("</table></section>")
    parts.append("</body></html>")
    return "".join(parts)


def write_page(root: Path, df, metrics: Sequence[tuple[Path, dict]], plots: Sequence[Path], image_paths: dict, *,
               n: int = 12, seed: int = 0) -> Optional[Path]:
    """``<root>/results.html`` from the test run files of ``metrics`` (None when there are none)."""
    from avg.artifacts.runfiles import read_run
    from avg.core.io import atomic_open

    found = system_runs(metrics)
    if not found:
        return None
    runs = []
    for system, path, _ in found:
        # keyed by (gold, caption): stages number their queries differently
        runs.append((system, {(tuple(sorted(gold_set(r.gold))), r.query):
                              {"query": r.query, "gold": r.gold, "ranked": r.ranked, "scores": r.scores}
                              for r in read_run(path)}))
    cols = [c for c in ("system", "R@1", "R@5", "R@10", "R@20", "list_R@k", "mean_rank", "num_queries", "setting")
            if c in df.columns]
    table = df[df["split"] == "test"][cols].to_html(index=False, classes="metrics", border=0, na_rep="",
                                                     float_format=lambda v: f"{v:.2f}")
    page = build_page(f"AVG results: {root.name}", table, runs, image_paths, plots=plots, n=n, seed=seed)
    with atomic_open(root / PAGE) as f:
        f.write(page)
    return root / PAGE


__all__ = ["PAGE", "run_file_of", "system_runs", "thumbnail_uri", "build_page", "write_page"]
