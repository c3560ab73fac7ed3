"""Image loading that turns any file a captions dataset may hold into an RGB PIL image.

CLIP preprocessing expects 8-bit RGB. Real datasets also contain greyscale, palette, 16-bit,
CMYK and transparent images, and the odd huge or broken file; ``load_rgb`` converts the first
kind faithfully (alpha composited on white, 16-bit scaled rather than clipped) and turns the
second kind into an ``InputError`` that names the file, so one bad image never crashes a long
feature run with a bare PIL traceback.

EXIF orientation is deliberately *not* applied: the public CLIP feature pipelines (and the
features the paper's numbers come from) read pixels as stored.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from avg.core.io import InputError

# Longest side kept after loading. CLIP resizes to 224/336 px anyway, so shrinking a
# 10000x10000 scan to this size first loses nothing and bounds the memory of what follows.
DEFAULT_MAX_SIDE = 4096
# Largest image accepted, in pixels (PIL's own guard warns at 89.5M and refuses 179M). Real scans
# of 10000x10000 (1e8) are fine: one decoded RGB copy is 300 MB. Above this cap a file is far more
# likely a decompression bomb than a photo, so it is refused by name before its pixels are decoded.
MAX_PIXELS = 250_000_000

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


@contextlib.contextmanager
def _no_pixel_limit() -> Iterator[None]:
    """Replace PIL's decompression-bomb guard by ours (MAX_PIXELS) for one call: huge photos are
    legitimate here, bombs are not. PIL raises above twice MAX_IMAGE_PIXELS and warns above it."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map integer / float single-channel pixels to 0..255 by their nominal range, not by clipping."""
    arr = arr.astype(np.float64)
    if mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    elif mode == "F":
        finite = arr[np.isfinite(arr)]
        mn, mx = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if mn >= 0.0 and mx <= 1.0:
            lo, hi = 0.0, 1.0
        elif mn >= 0.0 and mx <= 255.0:
            lo, hi = 0.0, 255.0
        else:
            lo, hi = mn, mx
        arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    else:  # "I": 32-bit signed; usually 8- or 16-bit data widened by the decoder
        mn, mx = float(arr.min()), float(arr.max())
        if mn >= 0 and mx <= 255:
            lo, hi = 0.0, 255.0
        elif mn >= 0 and mx <= 65535:
            lo, hi = 0.0, 65535.0
        else:
            lo, hi = mn, mx
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (arr - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any mode to RGB (alpha over white, high bit depth scaled)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        has_alpha = "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        gray = _scale_to_uint8(np.asarray(im), mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "1":
        return im.convert("L").convert("RGB")
    return im.convert("RGB")  # L, CMYK, YCbCr, ...


def load_rgb(path: str | os.PathLike, max_side: Optional[int] = DEFAULT_MAX_SIDE) -> Image.Image:
    """Read `path` as an RGB image; raise InputError naming the file if it cannot be read.

    Images whose longest side exceeds `max_side` are downscaled (JPEGs already while decoding,
    via ``draft``), keeping the aspect ratio; pass ``max_side=None`` to keep full resolution.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: image file is empty (0 bytes)")
    try:
        with _no_pixel_limit(), Image.open(path) as im:
            if max_side is not None and max(im.size) > max_side and im.format == "JPEG":
                im.draft("RGB" if im.mode in ("RGB", "YCbCr", "CMYK") else im.mode, (max_side, max_side))
            im.load()
            if max_side is not None and max(im.size) > max_side and im.mode == "L":
                # shrink before the RGB copy: a 1e8-pixel greyscale scan never becomes 300 MB of RGB
                im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            rgb = to_rgb(im)
            if max_side is not None and max(rgb.size) > max_side:
                rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            if rgb is im:  # detach from the file handle closed by the `with`
                rgb = rgb.copy()
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError:
        raise InputError(f"{path}: image has more than MAX_PIXELS={MAX_PIXELS:,} pixels (avg.data.images); refused "
                         "as a possible decompression bomb: downscale it, or leave it out with --skip-bad-images") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{path}: cannot decode image ({e})") from None
    return rgb
