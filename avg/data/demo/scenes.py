"""The demo's scenes: their vocabulary (shapes, colours, sizes, places, backgrounds and the words for
each), sampling a scene from an RNG, and drawing it (avg.data.demo)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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
