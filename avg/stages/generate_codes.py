"""Encode every image of ``prepare_emb/`` with a trained RQ-VAE and write the ``generate_codes/`` artifact.

    python -m avg.stages.generate_codes --rqvae-dir out/train_rqvae --emb-dir out/prepare_emb --out-dir out/generate_codes

Codes are the raw M vokens by default (``--disambiguation none``): images that share a code are
told apart where they are ranked, inside each gallery, by the documented seeded rule of
avg.search.gallery -- only codes that collide *in that gallery* are affected, and no meaningless
token enters the retriever's score. ``--disambiguation global`` is the earlier setting: if any raw
codes collide over all splits, one position holding the image's index in its group (``TIE_RULE``)
is appended to every code, which the retriever must then generate. stats.json reports the
collision rates either way, and the tokenizer's retrieval ceiling per held-out split
(``ceiling``): R@K of the split's caption features ranked against the RQ-VAE decoding of each
image's code (what the code alone keeps), next to the same against the raw image features (the
CLIP two-tower) -- ties between images that share a code broken by the gallery's rule.

The out dir's ``stage.json`` (avg.core.stages) refuses to overwrite codes of another configuration
without ``--force`` and, fingerprinting ``--rqvae-dir`` and ``--emb-dir``, tells when the codes are stale.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from avg.artifacts.registry import manifest_name
from avg.core.progress import tqdm

from avg.models.layout import LayoutQuantizer, has_layout, layout_arrays
from avg.models.rqvae import RQVAE
from avg.artifacts.codes import CODEBOOK, CODES, STATS, collision_stats, write_codes_json
from avg.rqvae.data import iter_feature_batches
from avg.artifacts.emb import INDEX, load_emb
from avg.core.io import InputError, save_npy, write_json
from avg.core.tracking import get_logger
from avg.core.cli import run_main
from avg.core.stages import add_force_arg, begin_stage, skip_if_done

TIE_RULE = (
    "images sharing the same raw voken code are ordered by the L2 distance of their encoder latent "
    "to its quantized vector (ascending, float32), ties broken by image_id (ascending string order); "
    "the extra position is the image's index in that order (0 for images alone on their code)"
)


@torch.no_grad()
def encode_features(model: RQVAE, features: np.ndarray, batch_size: int = 4096, device: str = "cpu", progress: bool = True):
    """Voken codes int64 [n, M] and quantization errors float32 [n] of every row of a (memory
    mapped) feature array; one float32 batch in memory at a time."""
    model = model.to(device).eval()
    n = features.shape[0]
    codes = np.empty((n, model.config.num_levels), dtype=np.int64)
    errors = np.empty(n, dtype=np.float32)
    bar = tqdm(total=n, desc="encode images", unit="img", disable=not progress, mininterval=2.0)
    for start, block in iter_feature_batches(features, batch_size):
        c, e = model.encode_with_error(block.to(device))
        codes[start : start + len(block)] = c.cpu().numpy()
        errors[start : start + len(block)] = e.float().cpu().numpy()
        bar.update(len(block))
    bar.close()
    return codes, errors


def disambiguate(codes: np.ndarray, errors: np.ndarray, image_ids: Sequence[str]) -> tuple[np.ndarray, int]:
    """Append the within-collision-group index (``TIE_RULE``) to every code when any collide.
    Returns (codes [n, M] or [n, M + 1], disambiguation size K = largest group, 1 if none)."""
    n = codes.shape[0]
    if n == 0:
        return codes, 1
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    largest = int(counts.max())
    if largest == 1:
        return codes, 1
    id_rank = np.empty(n, dtype=np.int64)
    id_rank[np.argsort(np.asarray(image_ids, dtype=str), kind="stable")] = np.arange(n)
    order = np.lexsort((id_rank, errors, inverse))  # group, then error, then image_id
    group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    index = np.empty(n, dtype=np.int64)
    index[order] = np.arange(n) - group_start[inverse[order]]
    return np.concatenate([codes, index[:, None]], axis=1), largest


DISAMBIGUATION_MODES = ("none", "global")
CEILING_SPLITS = ("val", "test")
CEILING_KS = (1, 5, 10, 20)


@torch.no_grad()
def tokenizer_ceiling(model: RQVAE, emb, raw: np.ndarray, image_ids: Sequence[str], split: str,
                      device: str = "cpu", depth: int = 100, batch_size: int = 1024,
                      rq_part: slice = slice(None)) -> Optional[dict]:
    """R@K of ``split``'s caption features against (a) the decoded codes and (b) the raw image
    features of the split's images (module docstring); None when the split has no captions."""
    from avg.metrics import retrieval_metrics
    from avg.search.gallery import Gallery

    img_rows = emb.image_rows(split)
    cap_rows = emb.caption_rows(split)
    if len(img_rows) == 0 or len(cap_rows) == 0:
        return None
    ids = [image_ids[i] for i in img_rows]
    gallery = Gallery(ids, raw[img_rows], name=f"{split} codes")
    model = model.to(device).eval()
    decoded = model.decode_codes(torch.from_numpy(gallery.unique_codes[:, rq_part]).to(device)).float()
    decoded = torch.nn.functional.normalize(decoded, dim=-1)
    images = torch.nn.functional.normalize(torch.from_numpy(np.asarray(emb.image_features[img_rows], dtype=np.float32)), dim=-1)
    gold = [image_ids[int(emb.captions[r]["image_row"])] for r in cap_rows]
    row_of = {image_id: i for i, image_id in enumerate(ids)}
    gold_rows = torch.tensor([row_of[g] for g in gold], dtype=torch.long)
    image_codes = torch.from_numpy(np.asarray(raw[img_rows], dtype=np.int64))
    code_row = {tuple(c): u for u, c in enumerate(gallery.unique_codes.tolist())}
    image_code_row = torch.tensor([code_row[tuple(c)] for c in image_codes.tolist()], dtype=torch.long)
    out = {}
    for name, keys in (("decoded_codes", decoded.cpu()), ("image_features", images)):
        k = min(depth, keys.shape[0])
        records, top_hits = [], torch.zeros(image_codes.shape[1])
        for lo in range(0, len(cap_rows), batch_size):
            rows = cap_rows[lo:lo + batch_size]
            q = torch.nn.functional.normalize(torch.from_numpy(np.asarray(emb.text_features[rows], dtype=np.float32)), dim=-1)
            sim = q @ keys.T
            top_s, top_i = sim.topk(k, dim=1)
            for j in range(len(rows)):
                if name == "decoded_codes":
                    ranked, _ = gallery.rank(gallery.unique_codes[top_i[j].numpy()], top_s[j].numpy())
                else:
                    ranked = [ids[i] for i in top_i[j].tolist()]
                records.append({"ranked": ranked, "gold": gold[lo + j]})
            per_image = sim[:, image_code_row] if name == "decoded_codes" else sim
            top_hits += gold_is_top_per_position(per_image, image_codes, gold_rows[lo:lo + len(rows)])
        m = retrieval_metrics(records, ks=CEILING_KS, gallery_size=len(ids))
        out[name] = {key: round(m[key], 2) for key in (*[f"R@{x}" for x in CEILING_KS], "num_queries", "gallery_size")}
        out[name]["gold_is_top"] = [round(100.0 * float(h) / len(cap_rows), 2) for h in top_hits]
    return out


def gold_is_top_per_position(scores: torch.Tensor, codes: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """How many queries, per code position t, have the best-scored image among those whose code
    starts with the gold image's first t vokens under the gold voken at t: the two-tower's own
    "gold is top given the gold prefix" (the retriever's per-position diagnostic, avg.retriever.
    diagnostics), a reference for what a retriever could reach there.

    ``scores`` [Q, G] query-image scores, ``codes`` [G, L] the images' codes, ``gold`` [Q] the gold
    image's row -> float [L] counts (ties go to the first image of the row).
    """
    gold_codes = codes[gold]  # [Q, L]
    under = torch.ones_like(scores, dtype=torch.bool)
    hits = []
    for t in range(codes.shape[1]):
        best = scores.masked_fill(~under, float("-inf")).argmax(1)
        hits.append((codes[best, t] == gold_codes[:, t]).sum().float())
        under &= codes[None, :, t] == gold_codes[:, t:t + 1]
    return torch.stack(hits)


def generate_codes(
    model: RQVAE,
    emb_dir: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 4096,
    disambiguation: str = "none",
    device: str = "cpu",
    progress: bool = True,
    layout: Optional[LayoutQuantizer] = None,
) -> dict:
    """Encode every image of ``emb_dir`` and write codes.json, codebook.npy and stats.json into
    ``out_dir`` (each atomically; codes.json last). Returns the stats dict. With a ``layout``
    quantizer (avg.models.layout) its vokens of the image's patch grid follow the RQ-VAE's M: the codes
    are M + L long, one codebook per level in codebook.npy (the RQ-VAE's shared book repeated)."""
    if disambiguation not in DISAMBIGUATION_MODES:
        raise ValueError(f"disambiguation must be one of {DISAMBIGUATION_MODES}, got {disambiguation!r}")
    emb_dir, out_dir = Path(emb_dir), Path(out_dir)
    emb = load_emb(emb_dir)
    cfg = model.config
    if emb.dim != cfg.input_dim:
        raise InputError(f"{emb_dir / INDEX}: features have dim {emb.dim} but the RQ-VAE expects {cfg.input_dim} (was it trained on another encoder?)")
    image_ids = [str(im["image_id"]) for im in emb.images]
    splits = [str(im["split"]) for im in emb.images]
    seen: set = set()
    for i, image_id in enumerate(image_ids):
        if image_id in seen:
            raise InputError(f"{emb_dir / INDEX}: images[{i}]: duplicate image_id {image_id!r}")
        seen.add(image_id)
    del seen

    raw, errors = encode_features(model, emb.image_features, batch_size, device, progress)
    if layout is not None:
        if emb.image_grid is None or emb.image_grid.shape[1:] != (layout.config.cells, layout.config.width):
            raise InputError(f"{emb_dir}: the layout quantizer reads a grid of {layout.config.cells} cells x "
                             f"{layout.config.width}; prepare_emb/image_grid.npy is "
                             f"{'missing' if emb.image_grid is None else emb.image_grid.shape[1:]}")
        lay = layout.encode(layout_arrays(emb.image_grid, np.arange(raw.shape[0]))).numpy()
        raw = np.concatenate([lay, raw] if layout.config.position == "first" else [raw, lay], 1)
    stats = {"num_images": int(raw.shape[0])}
    overall = collision_stats(raw, cfg.codebook_size)
    stats.update(
        raw_collision_rate=overall["collision_rate"],
        num_colliding_images=overall["num_colliding_images"],
        largest_group=overall["largest_group"],
        levels=overall["levels"],
    )
    split_arr = np.asarray(splits)
    stats["splits"] = {s: collision_stats(raw[split_arr == s], cfg.codebook_size) for s in sorted(set(splits))}
    ceiling = {}
    rq_part = slice(layout.config.levels, None) if layout is not None and layout.config.position == "first" \
        else slice(0, cfg.num_levels)
    for split in CEILING_SPLITS:  # what the RQ-VAE part of the code keeps of the pooled vector
        c = tokenizer_ceiling(model, emb, raw, image_ids, split, device=device, rq_part=rq_part)
        if c is not None:
            ceiling[split] = c
    stats["ceiling"] = ceiling
    allow_collisions = disambiguation == "none"
    if allow_collisions:
        final, k = raw, 1
        stats["final_collision_rate"] = overall["collision_rate"]
    else:
        final, k = disambiguate(raw, errors, image_ids)
        stats["final_collision_rate"] = collision_stats(final, max(cfg.codebook_size, k))["collision_rate"]
    levels = raw.shape[1]  # the RQ-VAE's M, plus the layout vokens
    disamb = final.shape[1] > levels
    stats.update(code_len=int(final.shape[1]), disambiguation=disamb, disambiguation_size=int(k) if disamb else 0,
                 disambiguation_mode=disambiguation, allow_collisions=allow_collisions)

    books = model.codebooks.detach().float().cpu().numpy()
    if layout is not None:  # one book per level, in the code's order: the RQ-VAE's (its shared book repeated), the layout's
        lay_books = np.zeros((layout.config.levels, cfg.codebook_size, books.shape[-1]), dtype=np.float32)
        lay_books[:, :layout.config.codebook_size] = layout.codebooks.float().cpu().numpy()  # unused entries: zero rows
        rq_books = books[[model.book_index(d) for d in range(cfg.num_levels)]]
        books = np.concatenate([lay_books, rq_books] if layout.config.position == "first" else [rq_books, lay_books])
        pooled = raw[:, layout.config.levels:] if layout.config.position == "first" else raw[:, :cfg.num_levels]
        stats["layout"] = {"mode": layout.config.mode, "levels": layout.config.levels, "position": layout.config.position,
                           "entries": layout.config.codebook_size,
                           "pooled_levels_collision_rate": collision_stats(pooled, cfg.codebook_size)["collision_rate"]}
    header = {
        "num_levels": cfg.num_levels + (layout.config.levels if layout is not None else 0),
        "codebook_size": cfg.codebook_size,
        "shared_codebook": cfg.shared_codebook and layout is None,
        "layout": None if layout is None else {"mode": layout.config.mode, "levels": layout.config.levels,
                                               "position": layout.config.position, "entries": layout.config.codebook_size,
                                               "score": layout.config.score},
        "evidence_levels": evidence_levels(layout, cfg.num_levels) or None,
        "code_len": int(final.shape[1]),
        "disambiguation": disamb,
        "disambiguation_size": int(k) if disamb else 0,
        "tie_rule": TIE_RULE if disamb else "none (no disambiguation position: images sharing a code are ordered by the gallery's seeded rule, avg.search.gallery)",
        "encoder": emb.index["encoder"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_npy(books, out_dir / CODEBOOK)
    write_json(stats, out_dir / STATS)
    write_codes_json(out_dir / CODES, header, zip(image_ids, final.tolist(), splits))
    return stats


def evidence_levels(layout: Optional[LayoutQuantizer], rq_levels: int) -> list[int]:
    """Code positions (0-based) the retriever scores over their level's whole alphabet (avg.retriever.vocab
    ``evidence_levels``): the layout vokens' when the quantizer says ``score="level"``, else none."""
    if layout is None or layout.config.score != "level":
        return []
    start = 0 if layout.config.position == "first" else rq_levels
    return list(range(start, start + layout.config.levels))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avg.stages.generate_codes", description=__doc__.split("\n\n")[0])
    p.add_argument("--rqvae-dir", required=True, help="trained tokenizer (model.safetensors + config.json from avg.stages.train_rqvae)")
    p.add_argument("--emb-dir", required=True, help="prepare_emb/ artifact from prepare_emb (image features of every split)")
    p.add_argument("--out-dir", required=True, help="where codes.json, codebook.npy and stats.json are written")
    p.add_argument("--batch-size", type=int, default=4096, help="images encoded per batch (memory stays one batch)")
    p.add_argument("--disambiguation", choices=DISAMBIGUATION_MODES, default="none",
                   help="none: raw M-voken codes, images sharing a code ordered by the gallery's seeded rule; "
                        "global: append every image's index within its group over all splits (earlier default)")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, cuda:1, ...")
    add_force_arg(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    log = get_logger("avg.generate_codes")
    if args.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = RQVAE.from_pretrained(args.rqvae_dir)
    layout = LayoutQuantizer.from_pretrained(args.rqvae_dir) if has_layout(args.rqvae_dir) else None
    emb = load_emb(args.emb_dir)  # bad input fails before the out dir is claimed
    if emb.dim != model.config.input_dim:
        raise InputError(f"{Path(args.emb_dir) / INDEX}: features have dim {emb.dim} but the RQ-VAE expects {model.config.input_dim} (was it trained on another encoder?)")
    del emb
    run = begin_stage(args.out_dir, manifest_name("generate_codes"), vars(args), inputs=[args.rqvae_dir, args.emb_dir],
                      force=args.force, ignore=("batch_size",))
    if run.up_to_date and skip_if_done():
        log.info("generate_codes: outputs in %s are complete and up to date; skipping", args.out_dir)
        return run.previous.get("summary") or {}
    stats = generate_codes(model, args.emb_dir, args.out_dir, batch_size=args.batch_size, disambiguation=args.disambiguation,
                           device=device, layout=layout)
    for split, c in stats.get("ceiling", {}).items():
        log.info("tokenizer ceiling (%s, %d captions over %d images): decoded codes %s | image features %s", split,
                 c["decoded_codes"]["num_queries"], c["decoded_codes"]["gallery_size"],
                 " ".join(f"{k}={c['decoded_codes'][k]:.2f}" for k in ("R@1", "R@5", "R@10", "R@20")),
                 " ".join(f"{k}={c['image_features'][k]:.2f}" for k in ("R@1", "R@5", "R@10", "R@20")))
    log.info(
        "%d images -> code_len %d; raw collision rate %.4f (%d images in colliding groups, largest group %d); final collision rate %.4f; wrote %s",
        stats["num_images"], stats["code_len"], stats["raw_collision_rate"], stats["num_colliding_images"], stats["largest_group"], stats["final_collision_rate"], args.out_dir,
    )
    run.complete({k: stats[k] for k in ("num_images", "code_len", "raw_collision_rate", "final_collision_rate")})
    return stats


if __name__ == "__main__":
    run_main(main)
