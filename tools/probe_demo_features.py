"""What do the demo's CLIP features know about a scene? Linear probes, trained on TRAIN images and
scored on TEST images, from the pooled image feature (``prepare_emb/image_features.npy``) and from the
patch grid (``prepare_emb/image_grid.npy``, written by ``prepare_emb --image-grid``) to the scene's facts
recorded by the demo generator: which shapes, which colours, which of the 3 x 3 cells are
occupied, the background colour, and (shape, colour) and (cell, colour) pairs.

Each fact is a binary label; the table gives the F1 of the positive class on TEST (a probe that
says "absent" everywhere scores 0), next to the label's base rate. Used to find where the demo's
recall is lost (docs/results.md, "What the features know"): a reranker can only use what its inputs carry.

    python tools/probe_demo_features.py --emb-dir outputs/demo/prepare_emb --annotations data/demo/dataset_demo.json
    python tools/probe_demo_features.py ... --codes paper=outputs/demo/generate_codes --codes layout=<root>/generate_codes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from avg.artifacts.emb import load_emb  # noqa: E402
from avg.data.demo import BG_COLOURS, COLOURS, SHAPES  # noqa: E402
from avg.core.cli import run_main  # noqa: E402
from avg.core.io import InputError, read_json  # noqa: E402

CELLS = [(r, c) for r in range(3) for c in range(3)]


def scene_labels(scene: dict) -> dict[str, list[bool]]:
    """Binary facts of one generated scene, grouped."""
    objs = scene["objects"]
    return {
        "shape present": [any(o["shape"] == s for o in objs) for s in SHAPES],
        "colour present": [any(o["colour"] == c for o in objs) for c in COLOURS],
        "cell occupied": [any(tuple(o["cell"]) == cell for o in objs) for cell in CELLS],
        "background colour": [b in scene["background"]["colours"] for b in BG_COLOURS],
        "(shape, colour)": [any(o["shape"] == s and o["colour"] == c for o in objs) for s in SHAPES for c in COLOURS],
        "(cell, colour)": [any(tuple(o["cell"]) == cell and o["colour"] == c for o in objs) for cell in CELLS for c in COLOURS],
    }


def linear_probe(x_train, y_train, x_test, *, steps: int, lr: float, seed: int) -> torch.Tensor:
    """Logistic regression per label (full batch Adam on standardised inputs) -> test predictions."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    xtr, xte = (x_train - mean) / std, (x_test - mean) / std
    probe = torch.nn.Linear(xtr.shape[1], y_train.shape[1])
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(probe(xtr), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (probe(xte) > 0).float()


def f1(pred: torch.Tensor, gold: torch.Tensor) -> float:
    return float(2 * (pred * gold).sum() / (pred.sum() + gold.sum()).clamp_min(1))


def decoded_codes(codes_dir: Path, rqvae_dir: Path, image_ids: list[str]) -> torch.Tensor:
    """What each image's code keeps [n, d]: the RQ-VAE's decoding of its M vokens, then (when the code has layout
    vokens) the layout quantizer's decoding of them, flattened; a disambiguation voken is left out."""
    from avg.artifacts.codes import load_codes
    from avg.models.layout import LayoutQuantizer
    from avg.models.rqvae import RQVAE

    codes = load_codes(codes_dir)
    model = RQVAE.from_pretrained(rqvae_dir)
    missing = [i for i in image_ids if i not in codes.images]
    if missing:
        raise InputError(f"{codes_dir / 'codes.json'}: no code for image {missing[0]!r} of the embeddings")
    table = torch.tensor([codes.code(i) for i in image_ids], dtype=torch.long)
    m = model.config.num_levels
    lay = codes.layout["levels"] if codes.layout else 0
    first = lay > 0 and codes.layout["position"] == "first"
    rq_cols, lay_cols = (slice(lay, lay + m), slice(0, lay)) if first else (slice(0, m), slice(m, m + lay))
    with torch.no_grad():
        parts = [model.decode_codes(table[:, rq_cols]).float()]
        if lay:
            parts.append(LayoutQuantizer.from_pretrained(rqvae_dir).decode(table[:, lay_cols]).float().reshape(len(image_ids), -1))
    return torch.cat(parts, 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--emb-dir", required=True, help="prepare_emb/ folder of the demo dataset")
    p.add_argument("--annotations", required=True, help="the demo's dataset_demo.json (it records every scene)")
    p.add_argument("--steps", type=int, default=300, help="full-batch optimisation steps per probe")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codes", action="append", default=[], metavar="NAME=DIR",
                   help="also probe what a tokenizer's codes keep: generate_codes/ DIR whose train_rqvae/ is beside it "
                        "(the RQ-VAE's decoding of its vokens, plus the layout quantizer's decoding of the layout vokens); "
                        "repeatable")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    emb = load_emb(args.emb_dir)
    scenes = {im["filename"]: im.get("scene") for im in read_json(args.annotations)["images"]}
    rows = []
    for n, im in enumerate(emb.images):
        scene = scenes.get(im["image_id"])
        if scene is None:
            raise InputError(f"{args.annotations}: no scene recorded for image {im['image_id']!r} (prepare_emb/ images[{n}]): "
                             "probes need the demo generator's json")
        rows.append(scene_labels(scene))
    groups = list(rows[0])
    split = np.array([im["split"] for im in emb.images])
    train, test = torch.from_numpy(split == "train"), torch.from_numpy(split == "test")
    inputs = {"pooled feature": torch.from_numpy(np.asarray(emb.image_features, dtype=np.float32))}
    if emb.image_grid is not None:
        inputs[f"patch grid ({emb.image_grid.shape[1]} cells)"] = torch.from_numpy(
            np.asarray(emb.image_grid, dtype=np.float32)).flatten(1)
    for item in args.codes:
        name, _, codes_dir = item.partition("=")
        if not name or not codes_dir:
            raise InputError(f"--codes {item!r}: expected NAME=DIR (a generate_codes/ folder)")
        inputs[f"{name} codes"] = decoded_codes(Path(codes_dir), Path(codes_dir).parent / "train_rqvae",
                                                [im["image_id"] for im in emb.images])
    out: dict = {}
    print(f"linear probes, TEST F1 of the positive class ({int(train.sum())} train / {int(test.sum())} test images)")
    print("| fact | base rate | " + " | ".join(inputs) + " |")
    print("|---|---|" + "---|" * len(inputs))
    for g in groups:
        y = torch.tensor([r[g] for r in rows], dtype=torch.float32)
        scores = {}
        for name, x in inputs.items():
            pred = linear_probe(x[train], y[train], x[test], steps=args.steps, lr=args.lr, seed=args.seed)
            scores[name] = f1(pred, y[test])
        out[g] = {"base_rate": float(y[test].mean()), **scores}
        print(f"| {g} | {out[g]['base_rate']:.3f} | " + " | ".join(f"{scores[n]:.3f}" for n in inputs) + " |")
    return out


if __name__ == "__main__":
    run_main(main)
