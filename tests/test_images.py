"""load_rgb: every PIL mode a dataset may hold comes back as sensible RGB; broken files name themselves."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from avg.data.images import load_rgb
from avg.core.io import InputError


def _px(im: Image.Image, xy=(0, 0)) -> tuple:
    assert im.mode == "RGB"
    return im.getpixel(xy)


def test_rgb_and_grey_modes(tmp_path):
    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "rgb.png")
    Image.new("L", (8, 6), 77).save(tmp_path / "l.png")
    Image.new("1", (8, 6), 1).save(tmp_path / "bw.png")
    im = load_rgb(tmp_path / "rgb.png")
    assert im.size == (8, 6) and _px(im) == (10, 20, 30)
    assert _px(load_rgb(tmp_path / "l.png")) == (77, 77, 77)
    assert _px(load_rgb(tmp_path / "bw.png")) == (255, 255, 255)


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))      # fully transparent red -> white
    rgba.putpixel((1, 1), (255, 0, 0, 255))                # opaque red stays red
    rgba.putpixel((2, 2), (0, 0, 0, 128))                  # half-transparent black -> mid grey
    rgba.save(tmp_path / "a.png")
    im = load_rgb(tmp_path / "a.png")
    assert _px(im, (0, 0)) == (255, 255, 255)
    assert _px(im, (1, 1)) == (255, 0, 0)
    assert all(abs(v - 127) <= 1 for v in _px(im, (2, 2)))

    la = Image.new("LA", (4, 4), (0, 0))
    la.save(tmp_path / "la.png")
    assert _px(load_rgb(tmp_path / "la.png")) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    im = load_rgb(tmp_path / "p.png")
    assert _px(im, (0, 0)) == (0, 0, 0) and _px(im, (1, 0)) == (200, 10, 10)

    p.info["transparency"] = 0                              # index 0 transparent -> white
    p.save(tmp_path / "pt.png", transparency=0)
    im = load_rgb(tmp_path / "pt.png")
    assert _px(im, (0, 0)) == (255, 255, 255) and _px(im, (1, 0)) == (200, 10, 10)


def test_cmyk(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    r, g, b = _px(load_rgb(tmp_path / "c.jpg"))
    assert r > 200 and g < 60 and b < 60                    # pure magenta+yellow ink = red


def test_16bit_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")         # 16-bit greyscale PNG (I;16 / I)
    im = load_rgb(tmp_path / "g16.png")
    vals = [_px(im, (x, 0))[0] for x in range(4)]
    assert vals[0] == 0 and vals[2] == 255 and 126 <= vals[1] <= 129 and vals[3] in (3, 4)

    tif16 = Image.fromarray(np.full((2, 2), 65535 // 4, dtype=np.uint16))
    assert tif16.mode == "I;16"
    tif16.save(tmp_path / "g16.tif")
    assert 62 <= _px(load_rgb(tmp_path / "g16.tif"))[0] <= 65


def test_int32_and_float_modes(tmp_path):
    Image.fromarray(np.array([[0, 255]], dtype=np.int32), mode="I").save(tmp_path / "i8.tif")
    assert [_px(load_rgb(tmp_path / "i8.tif"), (x, 0))[0] for x in range(2)] == [0, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    vals = [_px(load_rgb(tmp_path / "f.tif"), (x, 0))[0] for x in range(3)]
    assert vals[0] == 0 and vals[2] == 255 and 127 <= vals[1] <= 128


@pytest.mark.parametrize("kind", ["empty", "truncated", "not_image", "missing"])
def test_unreadable_files_raise_input_error_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
        data = (tmp_path / "full.jpg").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not_image":
        path.write_text("this is not a jpeg\n" * 10)
    with pytest.raises(InputError, match=str(path).replace("\\", "\\\\")):
        load_rgb(path)


def test_huge_image_loads_despite_pixel_limit(tmp_path, monkeypatch):
    # A 3000x2000 image is a "decompression bomb" once the limit is 1M pixels (> 2x the limit
    # makes PIL refuse outright); load_rgb must lift the limit for its own call only.
    Image.new("L", (3000, 2000), 90).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.png")
    im = load_rgb(tmp_path / "big.png", max_side=None)
    assert im.size == (3000, 2000) and _px(im) == (90, 90, 90)
    assert Image.MAX_IMAGE_PIXELS == 1_000_000               # restored after the call


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_large_images_are_downscaled_to_max_side(tmp_path, ext):
    Image.new("RGB", (2400, 1200), (0, 128, 255)).save(tmp_path / f"wide.{ext}")
    im = load_rgb(tmp_path / f"wide.{ext}", max_side=600)
    assert im.size == (600, 300)
    r, g, b = _px(im, (300, 150))
    assert r < 10 and abs(g - 128) < 10 and b > 245
