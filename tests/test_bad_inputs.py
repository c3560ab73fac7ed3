"""Bad input, one test per case, each through a real entry point on tiny files in tmp_path.

The rule (issue 7): a bad input ends the run with a one-line error that names the file and the
record (exit status 2, no traceback, no output that looks complete), or it is an input we accept
on purpose, with documented behaviour that the test checks. Each test's docstring states the
behaviour a user should expect for its case.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Imported here, not inside tests: their module loggers bind sys.stderr once, at import, and a
# stream that pytest closes after one test must not become their console.
from avg.stages import prepare_retriever_dataset as prepare_dataset, train_retriever_t5 as train_t5
from avg.stages import prepare_emb, train_rqvae
from avg.artifacts.emb import load_emb, save_emb
from avg.core.cli import run_main
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a red square on a white background"


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    """scripts/test.sh exports WANDB_MODE=offline; these runs need no wandb files."""
    monkeypatch.setenv("WANDB_MODE", "disabled")


def run_cli(main, argv) -> tuple[int, str]:
    """Run an entry point the way ``python -m`` does (through run_main): (exit status, stderr).

    stderr goes to a buffer that is never closed: loggers a failed run leaves behind keep it as
    their stream, and must never write to a stream pytest has closed (as capsys's are)."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), pytest.raises(SystemExit) as exc:
        run_main(lambda: main([str(a) for a in argv]))
    return exc.value.code, buf.getvalue()


def assert_clean_error(code: int, err: str, *names: str) -> None:
    """Exit status 2, one ``error:`` line and no traceback, naming every string in ``names``."""
    assert code == 2, err
    assert "Traceback" not in err and "error: " in err, err
    for name in names:
        assert name in err, f"{name!r} not in error message:\n{err}"


def leftovers(out_dir: Path) -> list[str]:
    """Files under ``out_dir`` (and half-built ``.name.*`` siblings) that a failed run left behind.

    A stage manifest (stage.json, status "running"), logs and the run's config.json are allowed:
    they do not look like a finished result (the RQ-VAE tests check model.safetensors themselves)."""
    allowed = {"stage.json", "train.log", "metrics.jsonl", "eval.log", "environment.json", "config.json"}
    found = []
    if out_dir.exists():
        found += [str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file() and p.name not in allowed
                  and "wandb" not in p.parts]
    if out_dir.parent.exists():
        found += [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
    return found


def png(path: Path, colour=(200, 30, 30), size=(32, 32), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def one_colour_png(path: Path, width: int, height: int, grey: int = 128) -> Path:
    """A greyscale PNG of one colour written row by row: any size, small on disk (~0.5 MB per 1e8 pixels), no big array."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp, row, parts = zlib.compressobj(1), b"\x00" + bytes([grey]) * width, []
    for _ in range(height):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def karpathy(path: Path, images: list[dict]) -> Path:
    path.write_text(json.dumps({"images": images}), encoding="utf-8")
    return path


def entry(filename: str, split: str = "train", captions=(CAPTION,)) -> dict:
    return {"filename": filename, "split": split, "sentences": [{"raw": c} for c in captions]}


def small_dataset(root: Path, n: int = 3) -> tuple[Path, Path, list[dict]]:
    """``n`` good 32x32 images (train/val/test in turn) and their Karpathy json; returns (json, image root, entries)."""
    images = root / "images"
    entries = []
    for i in range(n):
        name = f"good{i}.png"
        png(images / name, colour=(40 * i, 200 - 40 * i, 90))
        entries.append(entry(name, ("train", "val", "test")[i % 3], (f"{CAPTION} number {i}", f"picture {i}")))
    return karpathy(root / "dataset.json", entries), images, entries


# ------------------------------------------------------------------------------------ prepare_emb
@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory) -> Path:
    """A randomly initialised avg-demo-vit saved as an open_clip checkpoint (as the demo CLIP is)."""
    import open_clip

    from avg.models.clip import register_clip_configs
    from avg.models.demo_clip import save_open_clip_checkpoint

    register_clip_configs()
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("avg-demo-vit", pretrained=None)
    return save_open_clip_checkpoint(model, tmp_path_factory.mktemp("clip") / "clip.pt", extra={"model": "avg-demo-vit"})


def emb_argv(json_path, image_root, out_dir, ckpt, *extra):
    return [str(a) for a in ("--annotations", json_path, "--image-root", image_root, "--out-dir", out_dir,
                             "--backend", "open_clip", "--clip-model", "avg-demo-vit", "--pretrained", ckpt,
                             "--num-workers", "0", "--batch-size", "8", "--no-progress", *extra)]


def prepare_emb_fails(tmp_path, ckpt, json_path, image_root, *names, extra=()) -> str:
    main = prepare_emb.main

    out = tmp_path / "emb"
    code, err = run_cli(main, emb_argv(json_path, image_root, out, ckpt, *extra))
    assert_clean_error(code, err, *names)
    assert leftovers(out) == [] and not (out / "index.json").exists()
    return err


def test_missing_image_file(tmp_path, clip_ckpt):
    """A json entry whose image file does not exist stops the run before the CLIP is even loaded,
    naming the json, the record (images[i], filename) and the path looked for."""
    json_path, root, entries = small_dataset(tmp_path)
    karpathy(json_path, entries + [entry("gone.jpg", "test")])
    prepare_emb_fails(tmp_path, clip_ckpt, json_path, root,
                      str(json_path), "images[3] (filename 'gone.jpg')", "image file not found", str(root / "gone.jpg"))


def test_missing_image_file_skipped_and_counted_with_flag(tmp_path, clip_ckpt):
    """With --skip-bad-images the same file is left out with its captions, and the skip is
    recorded in prepare_emb/index.json (image id, file, error); every other image is encoded."""
    main = prepare_emb.main

    json_path, root, entries = small_dataset(tmp_path)
    karpathy(json_path, entries + [entry("gone.jpg", "test", ("a lost picture",))])
    out = main(emb_argv(json_path, root, tmp_path / "emb", clip_ckpt, "--skip-bad-images"))
    emb = load_emb(out)
    assert [im["image_id"] for im in emb.images] == ["good0.png", "good1.png", "good2.png"]
    assert [s["image_id"] for s in emb.index["skipped_images"]] == ["gone.jpg"]
    assert "not found" in emb.index["skipped_images"][0]["error"]
    assert "a lost picture" not in {c["text"] for c in emb.captions} and emb.text_features.shape[0] == 6


def _bad_file(path: Path, kind: str) -> None:
    if kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path, format="JPEG", quality=95)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:  # non_image: text under an image extension
        path.write_text("<html><body>404 not found</body></html>\n" * 5)


@pytest.mark.parametrize("kind,expect", [("zero_byte", "image file is empty"), ("truncated", "cannot decode image"),
                                         ("non_image", "not a readable image")])
def test_unreadable_image_file(tmp_path, clip_ckpt, kind, expect):
    """A zero-byte, truncated or non-image file with a .jpg name stops prepare_emb with the file's
    path, its record (images[i] of the json) and the hint --skip-bad-images; no prepare_emb/ result is written."""
    json_path, root, entries = small_dataset(tmp_path)
    _bad_file(root / "bad.jpg", kind)
    karpathy(json_path, entries[:1] + [entry("bad.jpg", "val")] + entries[1:])
    prepare_emb_fails(tmp_path, clip_ckpt, json_path, root,
                      str(root / "bad.jpg"), expect, "images[1]", str(json_path), "--skip-bad-images")


def _mode_image(path: Path, mode: str) -> Image.Image:
    """Write a 32x32 image in `mode` under `path`; return the RGB picture load_rgb must turn it into."""
    yy, xx = np.mgrid[0:32, 0:32]
    grad = (xx * 8).astype(np.uint8)
    if mode == "L":
        Image.fromarray(grad, "L").save(path)
        return Image.fromarray(np.stack([grad] * 3, -1))
    if mode == "I;16":
        Image.fromarray((xx * 2000).astype(np.uint16)).save(path)      # 16-bit greyscale PNG
        assert Image.open(path).mode.startswith("I")
        g = np.rint(xx * 2000 * 255.0 / 65535.0).astype(np.uint8)       # scaled by 65535, not clipped
        return Image.fromarray(np.stack([g] * 3, -1))
    rgb = np.stack([grad, (yy * 8).astype(np.uint8), np.full_like(grad, 60)], -1)
    if mode == "P":
        im = Image.fromarray(rgb).quantize(16)
        im.save(path)
        return im.convert("RGB")
    if mode in ("RGBA", "LA"):
        alpha = np.where(xx < 16, 255, 0).astype(np.uint8)               # left opaque, right transparent
        base = rgb if mode == "RGBA" else np.stack([grad] * 3, -1)
        im = Image.fromarray(np.dstack([base, alpha]), "RGBA")
        (im if mode == "RGBA" else im.convert("LA")).save(path)
        expect = base.copy()
        expect[alpha == 0] = 255                                          # composited over white
        return Image.fromarray(expect)
    if mode == "CMYK":
        Image.fromarray(rgb).convert("CMYK").save(path, format="JPEG", quality=95)
        with Image.open(path) as im:
            assert im.mode == "CMYK"
            return im.convert("RGB")
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_image_mode_is_converted_to_rgb(tmp_path, clip_ckpt, mode):
    """Greyscale, palette, transparent, CMYK and 16-bit images are accepted: converted to RGB
    (alpha composited over white, 16-bit scaled by its range), so their features equal those of
    the same picture stored as 8-bit RGB."""
    main = prepare_emb.main

    root = tmp_path / "images"
    root.mkdir()
    ext = "jpg" if mode == "CMYK" else "png"
    expect = _mode_image(root / f"mode.{ext}", mode)
    expect.save(root / "expected.png")
    json_path = karpathy(tmp_path / "dataset.json", [entry(f"mode.{ext}", "train"), entry("expected.png", "test")])
    emb = load_emb(main(emb_argv(json_path, root, tmp_path / "emb", clip_ckpt)))
    assert emb.index["skipped_images"] == [] and emb.image_features.shape[0] == 2
    feats = emb.image_features.astype(np.float32)
    np.testing.assert_allclose(feats[0], feats[1], atol=5e-3)


def test_huge_image_is_downscaled_with_bounded_memory(tmp_path, clip_ckpt):
    """A 10000x10000 image (1e8 pixels: above PIL's 89.5M-pixel decompression-bomb warning, below
    its 2x error) is a legitimate scan: accepted with no warning, downscaled to 4096 px on the
    long side right after decoding, and encoded. Memory stays bounded by that one image's decoded
    copies: the extra peak RSS it costs prepare_emb (same process, against a warm-up run on small
    images) is under 400 MB. Measured: ~150 MB, as a greyscale scan is shrunk before it is turned
    into RGB (converting first cost ~700 MB). Images above avg.data.images.MAX_PIXELS are refused
    by name (next test)."""
    ckpt = clip_ckpt
    root = tmp_path / "images"
    one_colour_png(root / "huge.png", 10000, 10000, grey=77)
    png(root / "small.png", colour=(77, 77, 77))
    png(root / "small2.png", colour=(77, 77, 77))
    assert (root / "huge.png").stat().st_size < 1_000_000
    warm = karpathy(tmp_path / "warm.json", [entry("small2.png"), entry("small.png", "test")])
    json_path = karpathy(tmp_path / "dataset.json", [entry("huge.png"), entry("small.png", "test")])
    runs = [emb_argv(warm, root, tmp_path / "emb_warm", ckpt), emb_argv(json_path, root, tmp_path / "emb", ckpt)]
    code = ("import resource, sys, warnings\n"
            "from PIL import Image\n"
            "from avg.stages.prepare_emb import main\n"
            "warnings.simplefilter('error', Image.DecompressionBombWarning)\n"
            f"for argv in {runs!r}:\n"
            "    main(argv)\n"
            "    print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    warm_kb, huge_kb = [int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("MAXRSS_KB")]
    extra_mb = (huge_kb - warm_kb) / 1024
    assert extra_mb < 400, f"the 10000x10000 image cost {extra_mb:.0f} MB of extra peak memory"
    emb = load_emb(tmp_path / "emb")
    assert emb.index["skipped_images"] == [] and emb.image_features.shape[0] == 2
    feats = emb.image_features.astype(np.float32)        # same grey, any size -> same features
    np.testing.assert_allclose(feats[0], feats[1], atol=5e-3)


def test_decompression_bomb_is_refused_by_name(tmp_path, clip_ckpt):
    """An image above MAX_PIXELS (here 20000x20000 = 4e8 pixels, under 2 MB as a PNG) is refused
    before its pixels are decoded: a clear error naming the file and the limit (or a counted skip
    with --skip-bad-images), never an out-of-memory kill."""
    from avg.data.images import MAX_PIXELS

    json_path, root, entries = small_dataset(tmp_path)
    one_colour_png(root / "bomb.png", 20000, 20000)
    assert 20000 * 20000 > MAX_PIXELS
    karpathy(json_path, entries + [entry("bomb.png")])
    prepare_emb_fails(tmp_path, clip_ckpt, json_path, root, str(root / "bomb.png"), "images[3]", "pixels")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_long_caption_is_truncated_and_counted(tmp_path, clip_ckpt):
    """A 2,000-character caption is accepted: the text encoder keeps its first context-length
    tokens (32 for the demo CLIP, 77 for OpenAI's), and the run counts such captions in a warning
    and in prepare_emb/index.json ("truncated_captions"), so the user knows how many were cut."""
    log, main = prepare_emb.log, prepare_emb.main

    json_path, root, entries = small_dataset(tmp_path)
    long = ("a red square next to a blue circle and a green triangle " * 40)[:2000]
    entries[0]["sentences"].append({"raw": long})
    karpathy(json_path, entries)
    handler = _Records()
    log.addHandler(handler)
    try:
        emb = load_emb(main(emb_argv(json_path, root, tmp_path / "emb", clip_ckpt)))
    finally:
        log.removeHandler(handler)
    assert long in [c["text"] for c in emb.captions] and emb.text_features.shape[0] == 7
    assert emb.index["truncated_captions"] == 1
    assert any("1 caption" in m and "truncated" in m for m in handler.messages), handler.messages


# ------------------------------------------------------------------------------------ captions json
def karpathy_fails(tmp_path, clip_ckpt, json_path, root, *names):
    return prepare_emb_fails(tmp_path, clip_ckpt, json_path, root, str(json_path), *names)


@pytest.mark.parametrize("raw,label", [("", "empty"), ("  \t\n ", "whitespace")])
def test_empty_or_whitespace_caption(tmp_path, clip_ckpt, raw, label):
    """An empty or whitespace-only caption is an error (not a silent skip: it usually means a
    broken conversion), naming the image record and the sentence index."""
    json_path, root, entries = small_dataset(tmp_path)
    entries[1]["sentences"].append({"raw": raw})
    karpathy(json_path, entries)
    karpathy_fails(tmp_path, clip_ckpt, json_path, root, "images[1] (filename 'good1.png')", "sentences[2]",
                   "empty or whitespace-only")


def test_non_utf8_caption(tmp_path, clip_ckpt):
    """A caption saved in Latin-1 inside the json makes the file non-UTF-8: the error gives the
    offending byte, its line and offset, and asks for UTF-8 (no guessing at encodings)."""
    json_path, root, entries = small_dataset(tmp_path)
    entries[2]["sentences"][0]["raw"] = "a caf\u00e9 table"
    text = json.dumps({"images": entries}, ensure_ascii=False, indent=1)
    json_path.write_bytes(text.encode("latin-1"))
    line = text[: text.index("caf\u00e9")].count("\n") + 1
    karpathy_fails(tmp_path, clip_ckpt, json_path, root, "not UTF-8", "0xe9", f"line {line}")


def test_malformed_json(tmp_path, clip_ckpt):
    """A truncated json file: the error names the file, line and column."""
    json_path, root, entries = small_dataset(tmp_path)
    text = json.dumps({"images": entries}, indent=1)
    json_path.write_text(text[: len(text) // 2])
    karpathy_fails(tmp_path, clip_ckpt, json_path, root, "malformed JSON at line")


def test_unknown_split(tmp_path, clip_ckpt):
    """A split other than train/val/test/restval (e.g. "dev") is an error naming the record, not
    a silent drop of those images."""
    json_path, root, entries = small_dataset(tmp_path)
    entries[2]["split"] = "dev"
    karpathy(json_path, entries)
    karpathy_fails(tmp_path, clip_ckpt, json_path, root, "images[2] (filename 'good2.png')", "unknown split 'dev'")


def test_duplicate_filenames(tmp_path, clip_ckpt):
    """Two records with one filename would give two images one id: an error naming both records."""
    json_path, root, entries = small_dataset(tmp_path)
    karpathy(json_path, entries + [entry("good0.png", "test", ("another caption",))])
    karpathy_fails(tmp_path, clip_ckpt, json_path, root, "images[3] (filename 'good0.png')",
                   "duplicate filename", "also images[0]")


@pytest.mark.parametrize("sentences", [[], None], ids=["empty_list", "no_key"])
def test_image_without_sentences(tmp_path, clip_ckpt, sentences):
    """An image with no captions cannot be a retrieval target: an error naming the record."""
    json_path, root, entries = small_dataset(tmp_path)
    if sentences is None:
        del entries[0]["sentences"]
    else:
        entries[0]["sentences"] = sentences
    karpathy(json_path, entries)
    karpathy_fails(tmp_path, clip_ckpt, json_path, root, "images[0] (filename 'good0.png')", "no sentences")


# ------------------------------------------------------------------------------------ prepare_emb/ arrays
def fake_emb(out: Path, n_images: int = 12, dim: int = 8, caps: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n_images, dim)).astype(np.float16)
    txt = rng.normal(size=(n_images * caps, dim)).astype(np.float16)
    images = [{"image_id": f"im{i}.jpg", "file": f"im{i}.jpg", "split": ("train", "train", "val", "test")[i % 4]}
              for i in range(n_images)]
    captions = [{"text": f"caption {j}", "image_row": j // caps, "split": images[j // caps]["split"]}
                for j in range(n_images * caps)]
    return save_emb(out, img, txt, images, captions, encoder={"backend": "test", "model": "none", "pretrained": None,
                                                                "normalized": False})


@pytest.mark.parametrize("array,what", [("image_features.npy", "images"), ("text_features.npy", "captions")])
def test_feature_rows_disagree_with_index(tmp_path, array, what):
    """prepare_emb/ whose feature array has fewer rows than index.json lists (an interrupted copy, or
    arrays from another run): train_rqvae stops naming both files and both counts."""
    main = train_rqvae.main

    emb_dir = fake_emb(tmp_path / "emb")
    arr = np.load(emb_dir / array)
    np.save(emb_dir / array, arr[:-1])
    out = tmp_path / "rqvae"
    code, err = run_cli(main, ["--emb-dir", emb_dir, "--out-dir", out, "--epochs", "1", "--batch-size", "4"])
    assert_clean_error(code, err, str(emb_dir / array), str(emb_dir / "index.json"),
                       f"{arr.shape[0] - 1} rows", f"lists {arr.shape[0]} {what}")
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------ codes vs vokens
COLORS = ("red", "blue", "green", "white", "black")
SHAPES = ("cube", "ball", "cone", "ring", "star")


def _codes_dir(path: Path, images: list[dict], num_levels: int, codebook_size: int, seed: int) -> Path:
    """A generate_codes/ dir with unique random codes (no disambiguation position) for `images`."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    flat = rng.choice(codebook_size ** num_levels, size=len(images), replace=False)
    codes = {}
    for im, f in zip(images, flat):
        code = [int(f) // codebook_size ** (num_levels - 1 - d) % codebook_size for d in range(num_levels)]
        codes[im["filename"]] = {"code": code, "split": im["split"]}
    (path / "codes.json").write_text(json.dumps({
        "num_levels": num_levels, "codebook_size": codebook_size, "shared_codebook": True, "code_len": num_levels,
        "disambiguation": False, "disambiguation_size": 0, "tie_rule": "none", "encoder": {}, "images": codes}))
    np.save(path / "codebook.npy", rng.normal(size=(1, codebook_size, 8)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    """A tiny T5 retriever saved by train_t5 (stage 1, 0 epochs) on codes M=2, N=5; its data dir;
    the captions json. Shared, read-only."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")
    root = tmp_path_factory.mktemp("retriever")
    images = [entry(f"img{i}.jpg", "train" if i < 10 else ("val" if i < 13 else "test"),
                    (f"a {COLORS[i % 5]} {SHAPES[i // 5 % 5]}", f"the {SHAPES[i // 5 % 5]} is {COLORS[i % 5]}"))
              for i in range(16)]
    json_path = karpathy(root / "dataset.json", images)
    codes = _codes_dir(root / "codes", images, num_levels=2, codebook_size=5, seed=0)
    prepare_dataset.main(["--annotations", str(json_path), "--codes-dir", str(codes), "--out-dir", str(root / "data")])
    mod = load_tool("make_demo_t5")
    texts = [s["raw"] for im in images for s in im["sentences"]]
    mod.make_demo_t5(texts, root / "t5", vocab_size=40, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    train_t5.main(["--data-dir", str(root / "data"), "--codes-dir", str(codes), "--model", str(root / "t5"),
                   "--out-dir", str(root / "stage1"), "--epochs", "0", "--skip-test", "--num-beams", "3"])
    assert (root / "stage1" / "best" / "voken_vocab.json").is_file()
    yield {"root": root, "images": images, "json": json_path, "best": root / "stage1" / "best", "texts": texts,
           "make_t5": mod.make_demo_t5}
    mp.undo()


@pytest.mark.parametrize("num_levels,codebook_size,differs", [(3, 5, "num_levels"), (2, 9, "codebook_size")],
                         ids=["code_length", "codebook_size"])
def test_codes_disagree_with_the_retrievers_vokens(tmp_path, retriever, num_levels, codebook_size, differs):
    """Stage 2 started from a retriever whose vokens were made for other codes (another code
    length, or another codebook size) than the retriever_data it is given: an error naming the
    data's meta.json, the retriever's voken_vocab.json and the setting that differs, before any
    training -- not a size-mismatch traceback or, worse, a model trained on wrong tokens."""
    codes = _codes_dir(tmp_path / "codes", retriever["images"], num_levels, codebook_size, seed=1)
    data = tmp_path / "data"
    prepare_dataset.main(["--annotations", str(retriever["json"]), "--codes-dir", str(codes), "--out-dir", str(data)])
    out = tmp_path / "stage2"
    code, err = run_cli(train_t5.main, ["--stage", "2", "--init-from", retriever["best"], "--data-dir", data,
                                        "--out-dir", out, "--epochs", "1", "--skip-test", "--num-beams", "3"])
    assert_clean_error(code, err, str(data / "meta.json"), str(retriever["best"] / "voken_vocab.json"), differs)
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------ checkpoints
def test_rqvae_checkpoint_from_another_configuration(tmp_path):
    """--resume onto a checkpoint written with another codebook size: an error naming the
    checkpoint file and only the settings that differ (codebook_size 8 -> 16), not a torch
    size-mismatch traceback; the checkpoint is left as it was."""
    train = train_rqvae
    emb_dir = fake_emb(tmp_path / "emb", n_images=24)
    out = tmp_path / "rqvae"
    common = ["--emb-dir", emb_dir, "--out-dir", out, "--epochs", "2", "--batch-size", "8", "--latent-dim", "4",
              "--hidden-dims", "8", "--kmeans-samples", "16", "--num-levels", "2"]
    train.main([str(a) for a in common + ["--codebook-size", "8", "--stop-after-epochs", "1"]])
    ckpt = out / "checkpoints" / "last" / "train_state.json"
    before = ckpt.read_bytes()
    code, err = run_cli(train.main, common + ["--codebook-size", "16", "--resume"])
    assert_clean_error(code, err, str(ckpt), "codebook_size")
    assert "16" in err and "8" in err and "hidden_dims" not in err  # only what differs
    assert ckpt.read_bytes() == before and not (out / "model.safetensors").exists()


def test_t5_checkpoint_from_another_model_size(tmp_path, retriever):
    """train_t5 --resume onto checkpoints/last written by a T5 of another width (d_model 16 vs
    32): an error naming the checkpoint's model.safetensors and a tensor with both shapes, before
    anything is loaded -- not torch's size-mismatch traceback. (stage.json is removed first, as
    for a checkpoint copied from elsewhere: with it, the stage manifest refuses the changed
    --model earlier, naming stage.json.)"""
    root = retriever["root"]
    retriever["make_t5"](retriever["texts"], tmp_path / "t5_wide", vocab_size=40, d_model=32, num_layers=1,
                         num_heads=2, d_ff=32)
    out = tmp_path / "run"
    common = ["--data-dir", root / "data", "--codes-dir", root / "codes", "--out-dir", out, "--epochs", "2",
              "--skip-test", "--num-beams", "3", "--eval-every", "0", "--batch-size", "8"]
    train_t5.main([str(a) for a in common + ["--model", root / "t5", "--stop-after-steps", "1"]])
    ckpt = out / "checkpoints" / "last" / "model.safetensors"
    assert ckpt.is_file()
    (out / "stage.json").unlink()
    code, err = run_cli(train_t5.main, common + ["--model", tmp_path / "t5_wide", "--resume"])
    assert_clean_error(code, err, str(ckpt), "another model configuration", "(16, 16) in the checkpoint vs (32, 32) in the model")
    assert not (out / "best").exists()


# ------------------------------------------------------------------------------------ config files
def test_config_points_at_missing_path(tmp_path):
    """A dataset config (configs/<name>.sh) whose ANNOTATIONS / IMAGE_ROOT do not exist: the stage
    script stops with exit status 2 and a message naming the variable, the missing path and the
    config file, and writes no prepare_emb/."""
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", work / "scripts")
    shutil.copytree(ROOT / "configs" / "recipes", work / "configs" / "recipes")
    demo = (ROOT / "configs" / "demo.sh").read_text()
    cfg = work / "configs" / "broken.sh"
    cfg.write_text(f"DATA_DIR={tmp_path}/no_such_dataset\n" + demo.replace("DATA_DIR=${DATA_DIR:-data/demo}\n", ""))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "DATA_DIR", "IMAGE_ROOT", "ANNOTATIONS", "OUT_DIR")}
    env.update(DATASET="broken", WANDB_MODE="disabled", OUT_DIR=str(tmp_path / "out"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    res = subprocess.run(["bash", "scripts/prepare_emb.sh"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    for name in ("ANNOTATIONS", f"{tmp_path}/no_such_dataset/dataset_demo.json", "configs/broken.sh"):
        assert name in res.stderr, res.stderr
    assert not (tmp_path / "out" / "broken" / "emb").exists()
