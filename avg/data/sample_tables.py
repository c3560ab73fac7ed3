"""Sample queries with their gold image and top-k retrieved images, for people to look at.

``log_sample_table`` picks a seeded sample of run records and

* logs a ``wandb.Table`` (query, gold id + thumbnail, top-k ids + thumbnails, hit rank) to the
  logger's wandb run -- nothing happens on the wandb side when wandb is disabled or not
  initialised;
* always writes the same sample as ``samples_<name>.json`` and ``samples_<name>.md`` in
  `out_dir` (the eval dir), so offline users see what the retriever does; the markdown links the
  image files (paths relative to the markdown file).

Image paths come from :func:`resolve_image_paths`: the Karpathy annotations + image root when
given, else the ``prepare_emb/`` index next to the retriever data (``prepare_emb/index.json`` records the image
root and each image's file).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from avg.artifacts.registry import out as stage_out
from avg.metrics import first_hit_rank
from avg.core.io import InputError, atomic_open, read_json, write_json


def resolve_image_paths(*, image_root: Optional[str] = None, annotations: Optional[str] = None,
                        data_dir: Optional[str] = None) -> dict:
    """{image_id: image file path}; {} when no source is found (thumbnails are then left out).

    1. `image_root` + `annotations` (or the annotations recorded in ``<data_dir>/meta.json``):
       the Karpathy file's ``filepath/filename`` under the image root;
    2. else the ``prepare_emb/index.json`` beside `data_dir` (``<data_dir>/../prepare_emb``): its
       ``source.image_root`` (or `image_root` when given) + each image's ``file``.
    """
    data = Path(data_dir) if data_dir else None
    if annotations is None and data is not None and (data / "meta.json").is_file():
        annotations = ((read_json(data / "meta.json").get("sources") or {}).get("annotations"))
    if image_root and annotations:
        from avg.data.karpathy import load_karpathy

        ds = load_karpathy(annotations, image_root, check_files=False)
        return {im.image_id: str(im.path) for im in ds.images}
    if data is not None:
        index_path = data.parent / stage_out("prepare_emb") / "index.json"
        if index_path.is_file():
            return image_paths_from_index(read_json(index_path), image_root)
    return {}


def image_paths_from_index(index: dict, image_root: Optional[str] = None) -> dict:
    """{image_id: file} from an ``prepare_emb/index.json``: ``image_root`` (else the one it was built from) + ``file``."""
    root = image_root or (index.get("source") or {}).get("image_root")
    if not root:
        return {}
    return {str(im["image_id"]): os.path.join(str(root), im["file"]) for im in index.get("images", [])}


def thumbnail(path: Optional[str], size: int):
    """A small RGB PIL image, or None when the file is missing or unreadable."""
    if not path or not os.path.isfile(path):
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            return im
    except OSError:
        return None


def pick_samples(records: Sequence, n: int, topk: int, seed: int) -> list[dict]:
    """A seeded sample of `n` records as plain dicts {qid, query, gold, top, hit_rank} (query order kept)."""
    if not records:
        return []
    pick = np.sort(np.random.default_rng([seed, 17]).choice(len(records), min(n, len(records)), replace=False))
    out = []
    for i in pick:
        r = records[int(i)]
        get = (lambda k: r[k]) if isinstance(r, Mapping) else (lambda k: getattr(r, k))
        ranked = list(get("ranked"))
        out.append({"qid": get("qid"), "query": get("query"), "gold": get("gold"), "top": ranked[:topk],
                    "hit_rank": first_hit_rank(ranked, get("gold"))})
    return out


def _markdown(samples: list[dict], image_paths: Mapping[str, str], out_dir: Path, title: str) -> str:
    def img(image_id) -> str:
        p = image_paths.get(str(image_id))
        if not p:
            return f"`{image_id}`"
        rel = os.path.relpath(os.path.abspath(p), os.path.abspath(out_dir)).replace(os.sep, "/")
        return f"<img src=\"{rel}\" width=\"64\" title=\"{image_id}\"><br>`{image_id}`"

    topk = max((len(s["top"]) for s in samples), default=0)
    head = ["query", "gold", *[f"top {k + 1}" for k in range(topk)], "hit rank"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in samples:
        golds = s["gold"] if isinstance(s["gold"], (list, tuple)) else [s["gold"]]
        tops = [("**" + img(t) + "**") if t in golds else img(t) for t in s["top"]]
        tops += [""] * (topk - len(tops))
        cells = [s["query"].replace("|", "\\|"), " ".join(img(g) for g in golds), *tops,
                 str(s["hit_rank"]) if s["hit_rank"] is not None else "not found"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def log_sample_table(logger, records: Sequence, image_paths: Mapping[str, str], *, n: int = 8, topk: int = 5,
                     seed: int = 0, out_dir: Optional[str | os.PathLike] = None, name: str = "test",
                     key: Optional[str] = None, thumb_size: int = 96) -> list[dict]:
    """Log a wandb.Table of `n` seeded sample queries and write ``samples_<name>.{json,md}`` in `out_dir`.

    Returns the samples. `logger` is a RunLogger (or anything with a ``wandb_run`` attribute, or None).
    """
    if n < 0 or topk < 1:
        raise InputError(f"sample table: n must be >= 0 and topk >= 1, got n={n}, topk={topk}")
    samples = pick_samples(records, n, topk, seed)
    if not samples:
        return samples
    if out_dir is not None:
        out = Path(out_dir)
        write_json({"name": name, "seed": seed, "topk": topk,
                    "samples": [{**s, "gold_path": image_paths.get(str(s["gold"])),
                                 "top_paths": [image_paths.get(str(t)) for t in s["top"]]} for s in samples]},
                   out / f"samples_{name}.json")
        with atomic_open(out / f"samples_{name}.md") as f:
            f.write(_markdown(samples, image_paths, out, f"Sample {name} queries: gold image and top {topk}"))
    run = getattr(logger, "wandb_run", None) if logger is not None else None
    if run is None:
        return samples
    import wandb

    def cell(image_id):
        im = thumbnail(image_paths.get(str(image_id)), thumb_size)
        return wandb.Image(im, caption=str(image_id)) if im is not None else None

    columns = ["qid", "query", "gold_id", "gold", *[f"top{k + 1}" for k in range(topk)],
               *[f"top{k + 1}_id" for k in range(topk)], "hit_rank"]
    table = wandb.Table(columns=columns)
    for s in samples:
        gold = s["gold"][0] if isinstance(s["gold"], (list, tuple)) else s["gold"]
        tops = list(s["top"]) + [None] * (topk - len(s["top"]))
        table.add_data(str(s["qid"]), s["query"], str(gold), cell(gold),
                       *[cell(t) if t is not None else None for t in tops],
                       *[str(t) if t is not None else "" for t in tops],
                       s["hit_rank"] if s["hit_rank"] is not None else -1)
    run.log({key or f"eval/{name}/samples": table})
    return samples


__all__ = ["log_sample_table", "pick_samples", "resolve_image_paths", "image_paths_from_index", "thumbnail"]
