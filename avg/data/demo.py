"""Synthetic demo dataset: rendered scenes of simple shapes with varied, partly ambiguous captions.

No real image-caption set can be downloaded where the demo runs, so the demo retrieves rendered
scenes instead: 1-3 coloured shapes on a 3x3 grid over a varied background. Each image gets five
different captions; some name every object with its attributes and place, others only a part
("a red star on a striped background"), so captions usually identify one image but partial ones
match several, as real captions do. Output is a Karpathy json, read like Flickr30K or COCO.

Every image is drawn from its own RNG seeded by (seed, split, index), so the result is
byte-identical whatever the number of worker processes.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

from avg.data.karpathy import tokenize_caption
from avg.utils.io import atomic_dir, read_json, write_json

# Bump when the drawing or the captions change: cached demo data made by another version is rebuilt.
GENERATOR_VERSION = 1
JSON_NAME = "dataset_demo.json"
PARAMS_NAME = "demo_params.json"
DEMO_SPLITS = ("train", "val", "test")

# --- vocabulary -------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
SHAPE_WORDS = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape"),
    "star": ("star", "five-pointed star"),
    "diamond": ("diamond", "rhombus", "diamond shape"),
    "hexagon": ("hexagon", "six-sided shape"),
    "cross": ("cross", "plus sign", "plus shape"),
}
COLOURS = {
    "red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 215), "yellow": (245, 215, 35),
    "purple": (135, 55, 175), "orange": (245, 135, 25), "white": (250, 250, 250), "black": (15, 15, 15),
}
COLOUR_WORDS = {c: (c,) for c in COLOURS}
COLOUR_WORDS["purple"] = ("purple", "violet")
SIZES = ("small", "large")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
# Radius of a shape relative to half a grid cell: the largest never leaves its cell, so no overlap.
SIZE_RADIUS = {"small": 0.5, "large": 0.85}

CELLS = [(r, c) for r in range(3) for c in range(3)]
POSITION_WORDS = {
    (0, 0): ("in the top left corner", "at the top left", "in the upper left"),
    (0, 1): ("at the top", "at the top centre", "near the top edge"),
    (0, 2): ("in the top right corner", "at the top right", "in the upper right"),
    (1, 0): ("on the left", "at the left side", "on the left side"),
    (1, 1): ("in the centre", "in the middle", "at the center"),
    (1, 2): ("on the right", "at the right side", "on the right side"),
    (2, 0): ("in the bottom left corner", "at the bottom left", "in the lower left"),
    (2, 1): ("at the bottom", "at the bottom centre", "near the bottom edge"),
    (2, 2): ("in the bottom right corner", "at the bottom right", "in the lower right"),
}

BG_COLOURS = {
    "white": (245, 245, 245), "light grey": (200, 200, 200), "dark grey": (80, 80, 80),
    "beige": (230, 215, 180), "light blue": (175, 205, 235), "pink": (240, 200, 210),
    "navy": (30, 40, 90), "black": (25, 25, 25),
}
BG_COLOUR_WORDS = {c: (c,) for c in BG_COLOURS}
BG_COLOUR_WORDS.update({"light grey": ("light grey", "light gray", "pale grey"),
                        "dark grey": ("dark grey", "dark gray", "charcoal"),
                        "navy": ("navy", "dark blue")})
BG_KINDS = ("plain", "gradient", "stripes", "noise")
MIN_CONTRAST = 110.0      # RGB distance an object keeps from every background colour

PREFIXES = ("a picture of ", "an image of ", "a drawing of ", "there is ", "this image shows ",
            "a rendering of ", "a simple scene with ")
COUNT_WORDS = {1: ("one", "a single"), 2: ("two",), 3: ("three",)}
THING_WORDS = ("shapes", "objects", "figures")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]     # (row, col) on the 3x3 grid


@dataclass(frozen=True)
class Background:
    kind: str                 # plain | gradient | stripes | noise
    colours: tuple[str, ...]  # names in BG_COLOURS (two for gradient and stripes)
    direction: str = ""       # gradient/stripes: horizontal | vertical | diagonal


@dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple[SceneObject, ...]


# --- scene sampling -----------------------------------------------------------------------------
def _dist(a, b) -> float:
    return math.dist(a, b)


def _allowed_colours(bg: Background) -> list[str]:
    refs = [BG_COLOURS[c] for c in bg.colours]
    if bg.kind == "gradient":        # the middle of a gradient is a colour of the background too
        refs.append(tuple((x + y) / 2 for x, y in zip(*refs)))
    return [c for c, rgb in COLOURS.items() if all(_dist(rgb, r) >= MIN_CONTRAST for r in refs)]


def sample_scene(rng: random.Random) -> Scene:
    """1-3 objects of distinct (shape, colour) in distinct cells, each contrasting with the background."""
    while True:
        kind = rng.choice(BG_KINDS)
        if kind in ("gradient", "stripes"):
            c1, c2 = rng.sample(sorted(BG_COLOURS), 2)
            if _dist(BG_COLOURS[c1], BG_COLOURS[c2]) < 80:
                continue
            bg = Background(kind, (c1, c2), rng.choice(("horizontal", "vertical", "diagonal")))
        else:
            bg = Background(kind, (rng.choice(sorted(BG_COLOURS)),))
        colours = _allowed_colours(bg)
        if len(colours) >= 3:
            break
    n = rng.choices((1, 2, 3), weights=(0.25, 0.4, 0.35))[0]
    cells = rng.sample(CELLS, n)
    objects, used = [], set()
    for cell in cells:
        while True:
            shape, colour = rng.choice(SHAPES), rng.choice(colours)
            if (shape, colour) not in used:
                break
        used.add((shape, colour))
        objects.append(SceneObject(shape, colour, rng.choice(SIZES), cell))
    return Scene(bg, tuple(objects))


# --- rendering ----------------------------------------------------------------------------------
def _background_array(bg: Background, size: int, rng: random.Random) -> np.ndarray:
    cols = [np.array(BG_COLOURS[c], dtype=np.float32) for c in bg.colours]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    coord = {"horizontal": yy, "vertical": xx, "diagonal": (xx + yy) / 2}.get(bg.direction)
    if bg.kind == "gradient":
        t = (coord / (size - 1))[..., None]
        arr = cols[0] * (1 - t) + cols[1] * t
    elif bg.kind == "stripes":
        width = max(2, size // 8)
        mask = ((coord.astype(np.int64) // width) % 2 == 1)[..., None]
        arr = np.where(mask, cols[1], cols[0])
    else:
        arr = np.broadcast_to(cols[0], (size, size, 3)).astype(np.float32)
        if bg.kind == "noise":
            noise_rng = np.random.default_rng(rng.getrandbits(64))
            arr = arr + noise_rng.normal(0.0, 18.0, size=(size, size, 1)).astype(np.float32)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _regular_polygon(cx, cy, r, n, start_deg):
    return [(cx + r * math.cos(math.radians(start_deg + 360 * k / n)),
             cy + r * math.sin(math.radians(start_deg + 360 * k / n))) for k in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.82
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)], fill=fill)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + 0.15 * r, r, 3, -90), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, 0), fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rad * math.cos(a), cy + 0.08 * r + rad * math.sin(a)))
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w, h = 0.34 * r, r
        draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)
        draw.rectangle([cx - h, cy - w, cx + h, cy + w], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw at twice the size and box-downsample, a cheap antialiasing."""
    big = 2 * image_size
    img = Image.fromarray(_background_array(scene.background, big, rng), "RGB")
    draw = ImageDraw.Draw(img)
    half_cell = big / 6
    for obj in scene.objects:
        r = SIZE_RADIUS[obj.size] * half_cell
        slack = 0.8 * (half_cell - r)     # jitter that keeps the shape inside its cell
        cx = (2 * obj.cell[1] + 1) * half_cell + rng.uniform(-slack, slack)
        cy = (2 * obj.cell[0] + 1) * half_cell + rng.uniform(-slack, slack)
        _draw_shape(draw, obj.shape, cx, cy, r, COLOURS[obj.colour])
    return img.resize((image_size, image_size), Image.Resampling.BOX)


# --- captions -----------------------------------------------------------------------------------
def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _obj(rng, o: SceneObject, *, size=True, colour=True) -> str:
    words = ([rng.choice(SIZE_WORDS[o.size])] if size else []) + \
            ([rng.choice(COLOUR_WORDS[o.colour])] if colour else []) + [rng.choice(SHAPE_WORDS[o.shape])]
    return _article(" ".join(words))


def _pos(rng, o: SceneObject) -> str:
    return rng.choice(POSITION_WORDS[o.cell])


def _bg(rng, bg: Background) -> str:
    names = [rng.choice(BG_COLOUR_WORDS[c]) for c in bg.colours]
    if bg.kind == "plain":
        return rng.choice((f"a plain {names[0]} background", f"a {names[0]} background",
                           f"a solid {names[0]} backdrop"))
    if bg.kind == "noise":
        return rng.choice((f"a noisy {names[0]} background", f"a grainy {names[0]} background",
                           "a speckled background", "a noisy background"))
    if bg.kind == "gradient":
        return rng.choice(("a gradient background", f"a {names[0]} to {names[1]} gradient",
                           f"a {bg.direction} gradient from {names[0]} to {names[1]}"))
    return rng.choice(("a striped background", f"{bg.direction} {names[0]} and {names[1]} stripes",
                       f"a background of {bg.direction} stripes", "stripes"))


def _relation(rng, a: SceneObject, b: SceneObject) -> str:
    """A true spatial relation of a to b on the grid."""
    (ra, ca), (rb, cb) = a.cell, b.cell
    vert = "above" if ra < rb else "below" if ra > rb else ""
    horiz = "to the left of" if ca < cb else "to the right of" if ca > cb else ""
    options = []
    if vert:
        options += [vert] + (["over"] if vert == "above" else ["under", "beneath"])
    if horiz:
        options += [horiz, horiz.replace("to the ", "")]
    if vert and horiz:
        options.append(f"{vert} and {horiz}")
    if max(abs(ra - rb), abs(ca - cb)) == 1 and not vert:
        options += ["next to", "beside"]
    return rng.choice(options)


def _maybe_bg(rng, sc: Scene, text: str, p: float = 0.5) -> str:
    return f"{text} on {_bg(rng, sc.background)}" if rng.random() < p else text


# Complete captions: every object with its size, colour and shape.
def _full_positions(rng, sc):
    return _maybe_bg(rng, sc, _join([f"{_obj(rng, o)} {_pos(rng, o)}" for o in sc.objects]), 0.6)


def _full_relations(rng, sc):
    if len(sc.objects) < 2:
        return None
    objs = rng.sample(sc.objects, len(sc.objects))
    text = f"{_obj(rng, objs[0])} {_relation(rng, objs[0], objs[1])} {_obj(rng, objs[1])}"
    if len(objs) == 3:
        text += rng.choice((", and ", " with ", ", plus ")) + f"{_obj(rng, objs[2])} {_pos(rng, objs[2])}"
    return _maybe_bg(rng, sc, text, 0.4)


def _count_list(rng, sc):
    n = len(sc.objects)
    count, things = rng.choice(COUNT_WORDS[n]), rng.choice(THING_WORDS)
    if n == 1:
        things = things[:-1]
    items = _join([_obj(rng, o) for o in rng.sample(sc.objects, n)])
    return _maybe_bg(rng, sc, rng.choice((f"{count} {things}: {items}", f"{count} {things}, {items}")), 0.5)


# Partial captions: some objects or some attributes only.
def _one_with_bg(rng, sc):
    return f"{_obj(rng, rng.choice(sc.objects), size=rng.random() < 0.5)} on {_bg(rng, sc.background)}"


def _count_one(rng, sc):
    n = len(sc.objects)
    if n < 2:
        return None
    o = _obj(rng, rng.choice(sc.objects), size=rng.random() < 0.5)
    count, things = COUNT_WORDS[n][0], rng.choice(THING_WORDS)
    others = f"{COUNT_WORDS[n - 1][0]} other {things if n > 2 else things[:-1]}"
    return rng.choice((f"{count} {things}, one of them {o}", f"{count} {things} including {o}",
                       f"{o} and {others}"))


def _one_position(rng, sc):
    if len(sc.objects) < 2:
        return None
    o = rng.choice(sc.objects)
    return f"{_obj(rng, o, size=rng.random() < 0.6)} {_pos(rng, o)}"


def _colours_only(rng, sc):
    colours = list(dict.fromkeys(o.colour for o in sc.objects))
    words = [rng.choice(COLOUR_WORDS[c]) for c in colours]
    if len(sc.objects) == 1:
        text = f"{_article(words[0])} shape"
    elif len(colours) == 1:
        text = f"{COUNT_WORDS[len(sc.objects)][0]} {words[0]} shapes"
    else:
        text = f"{_join(words)} shapes"
    return f"{text} on {_bg(rng, sc.background)}"


def _shapes_only(rng, sc):
    if len({o.shape for o in sc.objects}) < len(sc.objects):
        return None     # "a circle and a circle" reads badly; other templates cover this scene
    return _maybe_bg(rng, sc, _join([_article(rng.choice(SHAPE_WORDS[o.shape])) for o in sc.objects]), 0.5)


def _pair_relation(rng, sc):
    if len(sc.objects) < 2:
        return None
    a, b = rng.sample(sc.objects, 2)
    return (f"{_obj(rng, a, size=rng.random() < 0.5)} {_relation(rng, a, b)} "
            f"{_obj(rng, b, size=rng.random() < 0.5, colour=rng.random() < 0.7)}")


COMPLETE_TEMPLATES: tuple[Callable, ...] = (_full_positions, _full_relations, _count_list)
PARTIAL_TEMPLATES: tuple[Callable, ...] = (_one_with_bg, _count_one, _one_position, _colours_only,
                                           _shapes_only, _pair_relation)


def _normal_form(text: str) -> str:
    return " ".join(tokenize_caption(text))


def make_captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """`n` captions that differ as word sequences: 2-3 complete, the rest partial, shuffled."""
    n_complete = rng.choice((2, 2, 3))
    out, seen, used = [], set(), set()
    for attempt in range(1000):
        if len(out) == n:
            break
        pool = COMPLETE_TEMPLATES if len(out) < n_complete or attempt > 200 else PARTIAL_TEMPLATES
        fresh = [t for t in pool if t not in used]      # vary the template before reusing one
        template = rng.choice(fresh if fresh and attempt < 100 else pool)
        text = template(rng, scene)
        if text is None:
            used.add(template)
            continue
        if rng.random() < 0.35:
            prefix = rng.choice(PREFIXES)
            if prefix == "there is " and not text.startswith(("a ", "an ", "one ")):
                prefix = "there are "
            text = prefix + text
        if _normal_form(text) in seen:
            continue
        seen.add(_normal_form(text))
        used.add(template)
        if rng.random() < 0.5:
            text = text[0].upper() + text[1:]
        if rng.random() < 0.5:
            text += "."
        out.append(text)
    if len(out) < n:   # cannot happen with the vocabulary above; guard against future edits
        raise RuntimeError(f"could not make {n} distinct captions for {scene}")
    rng.shuffle(out)
    return out


# --- dataset ------------------------------------------------------------------------------------
def _scene_dict(sc: Scene) -> dict:
    bg = sc.background
    return {"background": {"kind": bg.kind, "colours": list(bg.colours), "direction": bg.direction},
            "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "cell": list(o.cell)}
                        for o in sc.objects]}


def _make_one(task: tuple) -> tuple[str, list[str], dict]:
    """Sample, render and save one image (runs in a worker); returns (filename, captions, scene)."""
    seed, split, index, image_size, images_dir = task
    rng = random.Random(f"avg-demo/{seed}/{split}/{index}")   # str seeds hash with sha512: stable
    scene = sample_scene(rng)
    img = render_scene(scene, image_size, rng)
    captions = make_captions(scene, rng)
    filename = f"{split}_{index:06d}.png"
    img.save(os.path.join(images_dir, split, filename), format="PNG")
    return filename, captions, _scene_dict(scene)


def demo_params(*, n_train: int = 10000, n_val: int = 1000, n_test: int = 1000, image_size: int = 64,
                seed: int = 0) -> dict:
    """The parameters that determine the generated bytes (stored in demo_params.json)."""
    for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if n_train + n_val + n_test == 0:
        raise ValueError("the demo dataset needs at least one image")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
    return {"generator_version": GENERATOR_VERSION, "n_train": n_train, "n_val": n_val,
            "n_test": n_test, "image_size": image_size, "seed": int(seed)}


def generate_demo_dataset(out_dir, *, n_train: int = 10000, n_val: int = 1000, n_test: int = 1000,
                          image_size: int = 64, seed: int = 0, num_workers: Optional[int] = None,
                          progress: bool = True) -> Path:
    """Write `out_dir/dataset_demo.json`, `out_dir/images/<split>/*.png` and `demo_params.json`.

    Other files in `out_dir` are left alone. The images folder is built under a temporary name
    and swapped in; `demo_params.json` is removed first and written last, so it marks a complete
    dataset. Returns the json path. With more than one worker it starts a "spawn" process pool,
    so a calling script needs the usual `if __name__ == "__main__":` guard.
    """
    params = demo_params(n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PARAMS_NAME).unlink(missing_ok=True)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    total = sum(counts.values())
    if num_workers is None:
        num_workers = 1 if total < 500 else min(os.cpu_count() or 1, 8)

    images, sent_id = [], 0
    with atomic_dir(out_dir / "images") as images_dir:
        tasks = []
        for split in DEMO_SPLITS:
            (images_dir / split).mkdir()
            tasks += [(int(seed), split, i, image_size, str(images_dir)) for i in range(counts[split])]
        bar = _progress(total, progress)
        if num_workers > 1:
            # spawn, not fork: the caller may hold torch/OpenMP threads that a fork would deadlock on
            with mp.get_context("spawn").Pool(num_workers) as pool:
                results = []
                for res in pool.imap(_make_one, tasks, chunksize=64):
                    results.append(res)
                    bar.update(1)
        else:
            results = []
            for t in tasks:
                results.append(_make_one(t))
                bar.update(1)
        bar.close()
        for img_id, ((_, split, _, _, _), (filename, captions, scene)) in enumerate(zip(tasks, results)):
            sents = []
            for raw in captions:
                sents.append({"raw": raw, "tokens": tokenize_caption(raw), "imgid": img_id, "sentid": sent_id})
                sent_id += 1
            images.append({"filename": filename, "filepath": split, "split": split, "imgid": img_id,
                           "sentids": [s["sentid"] for s in sents], "sentences": sents, "scene": scene})
    json_path = out_dir / JSON_NAME
    write_json({"dataset": "demo", "generator": params, "images": images}, json_path, indent=None)
    write_json(params, out_dir / PARAMS_NAME)
    return json_path


def _progress(total: int, enabled: bool):
    from avg.utils.progress import tqdm
    return tqdm(total=total, desc="rendering demo images", unit="img", disable=not enabled, leave=False)


def ensure_demo_dataset(out_dir, *, force: bool = False, num_workers: Optional[int] = None,
                        progress: bool = True, **params) -> tuple[Path, bool]:
    """Generate the demo dataset unless `out_dir` already holds one made with the same parameters.

    Returns (json path, whether it was built now)."""
    out_dir = Path(out_dir)
    wanted = demo_params(**params)
    marker, json_path = out_dir / PARAMS_NAME, out_dir / JSON_NAME
    if not force and marker.is_file() and json_path.is_file() and (out_dir / "images").is_dir():
        try:
            if read_json(marker) == wanted:
                return json_path, False
        except ValueError:      # unreadable marker: rebuild
            pass
    return generate_demo_dataset(out_dir, num_workers=num_workers, progress=progress, **params), True


# --- text side of the demo's small language models (tools/make_demo_t5.py, tools/make_demo_llama.py) ---

def train_captions(annotations: str | os.PathLike) -> list[str]:
    """Captions of the TRAIN split only (restval counts as train): what the demo tokenizers may see."""
    from avg.data.karpathy import load_karpathy

    data = load_karpathy(annotations, Path(annotations).parent, check_files=False)
    return [c for im in data.split("train") for c in im.captions]


def train_caption_bpe(texts, vocab_size: int, special_tokens: list[str]):
    """A byte-pair ``tokenizers.Tokenizer`` over lower-cased Metaspace words ('▁' marks a word start,
    as in SentencePiece), trained on ``texts`` with ``special_tokens`` first (ids 0, 1, ...).

    BPE rather than Unigram: the ``tokenizers`` Unigram trainer returns a near character-level
    vocabulary on small caption sets. The caller adds its model family's post-processor (T5 appends
    ``</s>``, LLaMA prepends ``<s>``) and wraps it in a ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok
