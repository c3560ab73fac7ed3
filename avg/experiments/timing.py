"""The efficiency benchmark's measurement: time a search over a query sample, score the same rankings,
mark the recall-throughput front, and run every system over every gallery size (avg.experiments.efficiency
is its command line: inputs, outputs, plots).

No I/O: systems (avg.experiments.systems) and galleries (avg.experiments.scaling) come in, row dicts go out.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from avg.core.progress import tqdm
from avg.experiments.scaling import scale_gallery
from avg.experiments.systems import sync
from avg.metrics import retrieval_metrics


def time_search(search: Callable[[list], list], texts: Sequence[str], batch_size: int, *, max_seconds: float,
                warmup: int, device: torch.device) -> tuple[dict, list]:
    """Time `search` over `texts` in batches; stop after `max_seconds` of timed calls (>= 1 call)."""
    texts = list(texts)
    for i in range(warmup):
        search(texts[(i * batch_size) % len(texts):][:batch_size] or texts[:batch_size])
    sync(device)
    times, ranked, done = [], [], 0
    for lo in range(0, len(texts), batch_size):
        batch = texts[lo:lo + batch_size]
        sync(device)
        t0 = time.perf_counter()
        ranked.extend(search(batch))
        sync(device)
        times.append(time.perf_counter() - t0)
        done += len(batch)
        if sum(times) >= max_seconds:
            break
    total = sum(times)
    per_query_ms = [1000.0 * t / batch_size for t in times] if batch_size == 1 else [1000.0 * t for t in times]
    res = {"batch_size": batch_size, "queries_timed": done, "seconds": total,
           "queries_per_s": done / max(total, 1e-12), "latency_ms": statistics.median(per_query_ms),
           "latency_ms_p90": float(np.percentile(per_query_ms, 90)), "time_boxed": done < len(texts)}
    return res, ranked


def add_curve_recall(rows: list[dict], ranked_of: list[list]) -> None:
    """``exact_R@10`` (the share of exact CLIP search's top 10 a system returns in its own top 10, the
    usual ANN recall; exact = the ``clip_fp32`` batched run, else ``clip_fp16``) and ``curve_recall``,
    what the curves plot: R@10 of the gold image while the gallery holds only real images, else
    ``exact_R@10`` -- synthetic images are noisy copies of real ones, and a gold image among its own
    near-duplicates is missed by every system alike. On synthetic galleries the generative systems get
    none: a synthetic image's code is drawn independently of its feature, so its recall cannot be
    compared with the feature-based systems' (their throughput still can)."""
    ref = next((ranked_of[i] for name in ("clip_fp32", "clip_fp16") for i, r in enumerate(rows)
                if r["system"] == name and r["mode"] == "batch"), None)
    for r, ranked in zip(rows, ranked_of):
        if ref is not None and ranked:
            r["exact_R@10"] = 100.0 * float(np.mean([len(set(a[:10]) & set(b[:10])) / max(min(10, len(b)), 1)
                                                     for a, b in zip(ranked, ref)]))
        else:
            r["exact_R@10"] = None
        real = int(r["num_real"]) >= int(r["gallery_size"])
        if real:
            r["curve_recall"] = r["R@10"]
        elif str(r["system"]).startswith("avg"):
            r["curve_recall"] = None  # synthetic codes are drawn apart from the synthetic features: no comparable recall
        else:
            r["curve_recall"] = r["exact_R@10"]


def mark_pareto(rows: list[dict]) -> None:
    """Set ``pareto`` on the batched rows of one gallery size: not beaten on both queries/s and curve_recall."""
    from avg.experiments.ann import pareto_front

    for r in rows:
        r["pareto"] = None
    batched = [r for r in rows if r["mode"] == "batch" and r.get("curve_recall", r["R@10"]) is not None]
    for r, flag in zip(batched, pareto_front([(r["queries_per_s"], r.get("curve_recall", r["R@10"])) for r in batched])):
        r["pareto"] = flag


def benchmark(systems: Sequence, real: dict, queries: Sequence[dict], sizes: Sequence[int], *, batch_size: int,
              max_seconds: float, warmup: int, noise_std: float, seed: int, device: torch.device,
              progress: bool = True, log: Optional[Callable[[dict, int], None]] = None, curves: bool = False,
              curve_max_seconds: float = 3.0, sweep: Optional[dict] = None) -> list[dict]:
    """Rows of the efficiency table for every gallery size x system x mode (batch 1, ``batch_size``).

    `real`: {"image_ids", "features", "codes", "first"} (see scale_gallery); `queries`: [{"query", "gold"}].
    Each system is timed at its default knob in both modes; with ``curves`` its batched mode is also
    timed at every value of its knob (beam, reranked depth, nprobe, efSearch; ``sweep`` {system: values}
    overrides the defaults), each such point capped at ``curve_max_seconds``: one recall-throughput
    curve per system and gallery size; ``pareto`` marks the batched points no other point beats."""
    texts = [q["query"] for q in queries]
    rows = []
    for step, size in enumerate(tqdm(list(sizes), desc="gallery sizes", disable=not progress)):
        g = scale_gallery(real["image_ids"], real["features"], real["codes"], size, first=real.get("first", 0),
                          noise_std=noise_std, seed=seed)
        point, first, ranked_of = {}, len(rows), []
        for system in systems:
            if not getattr(system, "supports", lambda ids: True)(g.image_ids):
                continue  # e.g. the LM reranker beyond the real images: no image tokens or grids to read
            build_s = system.set_gallery(g.image_ids, g.codes, g.features)
            default = system.default_knob
            runs = [("batch1", 1, default, max_seconds)]
            values = system.knob_values(sweep.get(system.name) if sweep else None) if curves else [default]
            runs += [("batch", batch_size, v, max_seconds if v == default else curve_max_seconds) for v in values]
            for mode, bs, value, seconds in runs:
                system.set_knob(value)
                res, ranked = time_search(system.search, texts, bs, max_seconds=seconds, warmup=warmup, device=device)
                recs = [{"ranked": r, "gold": q["gold"]} for r, q in zip(ranked, queries)]
                m = retrieval_metrics(recs, ks=(1, 10), gallery_size=size)
                row = {"gallery_size": size, "num_real": g.num_real, "system": system.name,
                       "precision": system.precision, "mode": mode, "depth": getattr(system, "num_beams", None) or system.k,
                       "knob": system.knob, "knob_value": value, "default_knob": value == default,
                       **res, "structure_mb": system.structure_bytes / 2**20, "build_s": build_s,
                       "R@1": m["R@1"], "R@10": m["R@10"], "device": str(device)}
                rows.append(row)
                ranked_of.append(ranked)
                if value == default:
                    point[f"{system.name}/{mode}/queries_per_s"] = row["queries_per_s"]
                    point[f"{system.name}/{mode}/latency_ms"] = row["latency_ms"]
            system.set_knob(default)
            point[f"{system.name}/structure_mb"] = rows[-1]["structure_mb"]
        add_curve_recall(rows[first:], ranked_of)
        mark_pareto(rows[first:])
        if log is not None:
            log({"efficiency/gallery_size": size, **{f"efficiency/{k}": v for k, v in point.items()}}, step)
        del g
        gc.collect()
    for system in systems:  # free the largest gallery
        system.features = system.index = system.gallery = system.ann = None
    return rows


__all__ = ["add_curve_recall", "benchmark", "mark_pareto", "time_search"]
