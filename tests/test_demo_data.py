"""Synthetic demo dataset: determinism, format, caption variety and truthfulness, visibility."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avg.data import load_karpathy
from avg.data.demo import captions
from avg.data.demo import (COLOURS, SHAPE_WORDS, SceneObject, ensure_demo_dataset, generate_demo_dataset,
                           make_captions, sample_scene)
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_train=5, n_val=2, n_test=2, image_size=32)


def _tree(out_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_whatever_the_workers(tmp_path):
    generate_demo_dataset(tmp_path / "a", seed=3, num_workers=1, progress=False, **SMALL)
    generate_demo_dataset(tmp_path / "b", seed=3, num_workers=2, progress=False, **SMALL)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert len(a) == 9 + 2 and a == b
    generate_demo_dataset(tmp_path / "c", seed=4, num_workers=1, progress=False, **SMALL)
    c = _tree(tmp_path / "c")
    assert c.keys() == a.keys()
    assert c["dataset_demo.json"] != a["dataset_demo.json"]
    assert sum(c[k] != a[k] for k in a if k.endswith(".png")) >= 8


def test_loads_with_counts_sizes_and_modes(tiny_demo):
    ds = load_karpathy(tiny_demo.json_path, tiny_demo.image_root)       # checks every file exists
    assert ds.counts() == {"train": {"images": 24, "captions": 120}, "val": {"images": 8, "captions": 40},
                           "test": {"images": 8, "captions": 40}, "total": {"images": 40, "captions": 200}}
    assert ds.images[0].image_id == "train_000000.png" and ds.images[0].rel_path == "train/train_000000.png"
    assert len({im.image_id for im in ds.images}) == 40
    for im in ds.images:
        with Image.open(im.path) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)
        assert len(im.captions) == 5
        assert len({" ".join(re.findall(r"[a-z0-9-]+", c.lower())) for c in im.captions}) == 5
    params = json.loads((tiny_demo.out_dir / "demo_params.json").read_text())
    assert params["n_train"] == 24 and params["seed"] == 0


def _mentioned_shapes(caption: str) -> set[str]:
    text = caption.lower()
    return {shape for shape, words in SHAPE_WORDS.items() if any(re.search(rf"\b{re.escape(w)}\b", text)
                                                                for w in words)}


def test_captions_are_true_and_some_complete(tiny_demo):
    data = json.loads(tiny_demo.json_path.read_text())
    for im in data["images"]:
        shapes = {o["shape"] for o in im["scene"]["objects"]}
        caps = [s["raw"] for s in im["sentences"]]
        for cap in caps:
            assert _mentioned_shapes(cap) <= shapes, (cap, shapes)
        # at least two captions name every object (the complete templates)
        assert sum(_mentioned_shapes(c) == shapes and all(o["colour"] in c.lower() or
                   (o["colour"] == "purple" and "violet" in c.lower()) for o in im["scene"]["objects"])
                   for c in caps) >= 2


def test_caption_variety():
    """Synonyms, partial captions and background mentions all occur (captions only: no rendering)."""
    caps, partial, n_objects = [], 0, set()
    for i in range(300):
        rng = random.Random(i)
        scene = sample_scene(rng)
        n_objects.add(len(scene.objects))
        for cap in make_captions(scene, rng):
            caps.append(cap.lower())
            partial += _mentioned_shapes(cap) < {o.shape for o in scene.objects}
    words = " ".join(caps)
    for shape, syns in SHAPE_WORDS.items():
        assert all(re.search(rf"\b{re.escape(w)}\b", words) for w in syns), shape
    for w in ("large", "big", "small", "little", "tiny", "purple", "violet", "gradient", "stripes",
              "noisy", "plain", "left of", "above", "next to", "one of them", "including", "corner"):
        assert w in words, w
    assert n_objects == {1, 2, 3}
    assert 0.1 < partial / len(caps) < 0.6
    with_bg = sum("background" in c or "backdrop" in c or "stripes" in c or "gradient" in c for c in caps)
    assert 0.2 < with_bg / len(caps) < 0.9
    assert len(set(caps)) > 0.97 * len(caps)


def test_relations_are_spatially_correct():
    rng = random.Random(0)
    a, b = SceneObject("circle", "red", "small", (0, 0)), SceneObject("star", "blue", "large", (0, 1))
    c = SceneObject("cross", "green", "small", (2, 2))
    assert {captions._relation(rng, a, b) for _ in range(100)} == {"to the left of", "left of", "next to", "beside"}
    assert {captions._relation(rng, c, a) for _ in range(100)} == {
        "below", "under", "beneath", "to the right of", "right of", "below and to the right of"}


def test_objects_visible_and_in_their_cells(tiny_demo):
    data = json.loads(tiny_demo.json_path.read_text())
    for im in data["images"]:
        arr = np.asarray(Image.open(tiny_demo.image_root / im["filepath"] / im["filename"]), dtype=np.float32)
        cell = arr.shape[0] / 3
        for o in im["scene"]["objects"]:
            r, c = o["cell"]
            block = arr[int(r * cell):int((r + 1) * cell), int(c * cell):int((c + 1) * cell)]
            dist = np.linalg.norm(block - np.array(COLOURS[o["colour"]], np.float32), axis=-1)
            assert (dist < 30).sum() >= 8, (im["filename"], o)     # a solid patch of the object's colour


def test_ensure_skips_and_rebuilds(tmp_path):
    out = tmp_path / "d"
    (out / "clip").mkdir(parents=True)
    (out / "clip" / "keep.txt").write_text("other stages' files are left alone")
    path, built = ensure_demo_dataset(out, num_workers=1, progress=False, **SMALL)
    assert built and path == out / "dataset_demo.json"
    stamp = path.stat().st_mtime_ns
    assert ensure_demo_dataset(out, num_workers=1, progress=False, **SMALL) == (path, False)
    assert path.stat().st_mtime_ns == stamp
    _, built = ensure_demo_dataset(out, num_workers=1, progress=False, **{**SMALL, "seed": 1})
    assert built and json.loads((out / "demo_params.json").read_text())["seed"] == 1
    assert (out / "clip" / "keep.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["clip", "dataset_demo.json", "demo_params.json", "images"]


def test_bad_parameters_write_nothing(tmp_path):
    for bad in ({"n_train": -1}, {"image_size": 8}, {"n_train": 0, "n_val": 0, "n_test": 0}):
        with pytest.raises(ValueError):
            generate_demo_dataset(tmp_path / "x", progress=False, **bad)
    assert not (tmp_path / "x").exists()


def test_make_demo_data_cli(tmp_path, capsys):
    tool = load_tool("make_demo_data")
    args = ["--out", str(tmp_path / "d"), "--n-train", "3", "--n-val", "1", "--n-test", "1",
            "--image-size", "32", "--num-workers", "1"]
    assert tool.main(args) == 0
    out = capsys.readouterr().out
    assert "total:       5 images       25 captions" in out and "generated" in out
    assert tool.main(args) == 0 and "up to date" in capsys.readouterr().out
    assert tool.main(args + ["--force"]) == 0 and "generated" in capsys.readouterr().out
    assert tool.main(["--out", str(tmp_path / "e"), "--n-train", "-1"]) == 2
