"""Karpathy reader/validator and the caption-table converter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from avg.data import DatasetError, load_karpathy
from avg.data.convert import convert_captions
from avg.core.io import InputError
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _img(filename, split="train", sentences=("a dog runs",), **extra):
    rec = {"filename": filename, "split": split, "sentences": [{"raw": s} for s in sentences]}
    rec.update(extra)
    return rec


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    for rel in ("a.jpg", "b.jpg", "val2014/c.jpg", "d.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not really a jpeg")
    return root


def test_valid_file(tmp_path, image_root):
    path = _write(tmp_path / "dataset_x.json", {"images": [
        _img("a.jpg", "train", ["  A dog runs.  ", "a brown dog"]),
        _img("b.jpg", "restval", ["two cats"]),
        _img("c.jpg", "val", ["a red car", "a car", "car"], filepath="val2014"),
        _img("d.jpg", "test", ["a tree"], filepath=""),
    ], "dataset": "x"})
    ds = load_karpathy(path, image_root)
    assert [im.image_id for im in ds.images] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    a, b, c, d = ds.images
    assert a.captions == ("A dog runs.", "a brown dog")
    assert (b.split, b.orig_split) == ("train", "restval")
    assert c.rel_path == "val2014/c.jpg" and c.path == image_root / "val2014" / "c.jpg"
    assert d.rel_path == "d.jpg" and d.path == image_root / "d.jpg"
    assert [im.image_id for im in ds.split("train")] == ["a.jpg", "b.jpg"]
    assert ds.counts() == {"train": {"images": 2, "captions": 3}, "val": {"images": 1, "captions": 3},
                           "test": {"images": 1, "captions": 1}, "total": {"images": 4, "captions": 7}}
    with pytest.raises(ValueError):
        ds.split("restval")


def test_check_files_off(tmp_path):
    path = _write(tmp_path / "x.json", {"images": [_img("nowhere.jpg")]})
    with pytest.raises(DatasetError, match="not a directory"):
        load_karpathy(path, tmp_path / "missing_root")
    ds = load_karpathy(path, tmp_path / "missing_root", check_files=False)
    assert ds.images[0].path == tmp_path / "missing_root" / "nowhere.jpg"


def test_malformed_json(tmp_path, image_root):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [\n  {"filename": "a.jpg",,}\n]}', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad\.json: malformed JSON at line 2 column \d+"):
        load_karpathy(path, image_root)


def test_not_utf8(tmp_path, image_root):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "café"}]}]}'
                     .encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1\.json: not UTF-8 text .*line 1"):
        load_karpathy(path, image_root)


@pytest.mark.parametrize("obj, expect", [
    ({"annotations": []}, "no 'images' key"),
    ({"images": {"a": 1}}, "'images' is a dict"),
    ([1, 2], "list"),
    ({"images": []}, "empty"),
])
def test_missing_images_list(tmp_path, image_root, obj, expect):
    path = _write(tmp_path / "noimages.json", obj)
    with pytest.raises(DatasetError, match=r"noimages\.json: .*" + expect):
        load_karpathy(path, image_root)


def _problem(tmp_path, image_root, images, **kw) -> str:
    path = _write(tmp_path / "data.json", {"images": images})
    with pytest.raises(DatasetError) as info:
        load_karpathy(path, image_root, **kw)
    assert isinstance(info.value, InputError)
    return str(info.value)


def test_missing_filename(tmp_path, image_root):
    msg = _problem(tmp_path, image_root, [_img("a.jpg"), {"split": "train", "sentences": [{"raw": "x"}]}])
    assert "data.json: images[1]: missing or empty 'filename'" in msg


def test_missing_image_file(tmp_path, image_root):
    msg = _problem(tmp_path, image_root, [_img("a.jpg"), _img("zzz.jpg", filepath="val2014")])
    assert "data.json: images[1] (filename 'zzz.jpg'): image file not found" in msg
    assert str(image_root / "val2014" / "zzz.jpg") in msg
    load_karpathy(tmp_path / "data.json", image_root, check_files=False)   # fine without the check


@pytest.mark.parametrize("rec, expect", [
    (_img("../../../etc/passwd"), "'../../../etc/passwd' goes above the root"),
    (_img("passwd", filepath="/etc"), "'/etc/passwd' is absolute"),
    (_img("x.jpg", filepath="val2014/../../.."), "goes above the root"),
])
def test_path_escaping_the_image_root_is_refused_before_any_file_is_touched(tmp_path, image_root, rec, expect, monkeypatch):
    touched = []
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: touched.append(str(self)) or real_is_file(self))
    msg = _problem(tmp_path, image_root, [_img("a.jpg"), rec])
    assert "data.json: images[1]" in msg and expect in msg and "outside the image root" in msg
    assert not any("passwd" in t or t.endswith("x.jpg") for t in touched), touched
    inside = _write(tmp_path / "ok.json", {"images": [_img("c.jpg", filepath="val2014/sub/..")]})
    assert load_karpathy(inside, image_root, check_files=False).images[0].path == image_root / "val2014/sub/../c.jpg"


def test_convert_refuses_paths_leaving_the_image_root(tmp_path):
    table = tmp_path / "caps.csv"
    table.write_text("image,caption,split\na.jpg,x,train\n../../etc/passwd,y,train\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"caps\.csv: line 3 \(image '\.\./\.\./etc/passwd'\): image path .*, outside the image root"):
        convert_captions(table, tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()


def test_unknown_split(tmp_path, image_root):
    msg = _problem(tmp_path, image_root, [_img("a.jpg", "foo")])
    assert msg.endswith("data.json: images[0] (filename 'a.jpg'): unknown split 'foo' "
                        "(expected train/val/test/restval)")


@pytest.mark.parametrize("rec", [_img("a.jpg", sentences=()), {"filename": "a.jpg", "split": "train"}])
def test_no_sentences(tmp_path, image_root, rec):
    msg = _problem(tmp_path, image_root, [rec])
    assert "data.json: images[0] (filename 'a.jpg'): no sentences" in msg


@pytest.mark.parametrize("raw", ["", "   \n\t"])
def test_empty_caption(tmp_path, image_root, raw):
    msg = _problem(tmp_path, image_root, [_img("a.jpg", sentences=["ok", raw])])
    assert "data.json: images[0] (filename 'a.jpg'): sentences[1] caption is empty or whitespace-only" in msg


def test_duplicate_filename(tmp_path, image_root):
    msg = _problem(tmp_path, image_root, [_img("a.jpg"), _img("b.jpg"), _img("a.jpg", "test")])
    assert "data.json: images[2] (filename 'a.jpg'): duplicate filename 'a.jpg' (also images[0])" in msg


@pytest.mark.parametrize("raw", [42, None, ["a", "b"]])
def test_caption_not_a_string(tmp_path, image_root, raw):
    msg = _problem(tmp_path, image_root, [{"filename": "a.jpg", "split": "val", "sentences": [{"raw": raw}]}])
    assert "data.json: images[0] (filename 'a.jpg'): sentences[0] caption is not a string" in msg


def test_all_problems_reported_up_to_a_cap(tmp_path, image_root):
    msg = _problem(tmp_path, image_root, [_img("a.jpg", "foo"), _img("b.jpg", sentences=[" "])])
    assert msg.startswith(f"{tmp_path / 'data.json'}: 2 problem(s)")
    assert "images[0] (filename 'a.jpg'): unknown split" in msg
    assert "images[1] (filename 'b.jpg'): sentences[0] caption is empty" in msg
    many = [_img(f"x{i}.jpg", "nope") for i in range(30)]
    msg = _problem(tmp_path, image_root, many, check_files=False)
    assert msg.startswith(f"{tmp_path / 'data.json'}: 30 problem(s)")
    assert "images[19]" in msg and "images[20]" not in msg
    assert "10 more problem(s) not shown" in msg


def test_long_caption_allowed(tmp_path, image_root):
    long = "a dog " * 2000
    ds = load_karpathy(_write(tmp_path / "long.json", {"images": [_img("a.jpg", sentences=[long])]}), image_root)
    assert ds.images[0].captions == (long.strip(),)


# --- converter -------------------------------------------------------------------------------------
def test_convert_csv_round_trip(tmp_path, image_root):
    table = tmp_path / "caps.csv"
    table.write_text('image,caption,split\n'
                     'a.jpg,A dog runs.,train\n'
                     'val2014/c.jpg,"a red car, parked",val\n'
                     'a.jpg,"a brown\ndog",train\n'
                     'b.jpg,two cats,restval\n'
                     'd.jpg,a tree,test\n', encoding="utf-8")
    out = tmp_path / "out" / "dataset_mine.json"
    counts = convert_captions(table, out, image_root=image_root)
    assert counts["total"] == {"images": 4, "captions": 5}
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["dataset"] == "caps"
    assert [im["filename"] for im in data["images"]] == ["a.jpg", "c.jpg", "b.jpg", "d.jpg"]
    assert data["images"][1]["filepath"] == "val2014" and "filepath" not in data["images"][0]
    ds = load_karpathy(out, image_root)
    assert ds.images[0].captions == ("A dog runs.", "a brown\ndog")
    assert ds.images[1].path == image_root / "val2014" / "c.jpg"
    assert ds.images[2].split == "train" and ds.images[2].orig_split == "restval"


def test_convert_jsonl_round_trip_and_cli(tmp_path, image_root, capsys):
    table = tmp_path / "caps.jsonl"
    rows = [{"image": "val2014/c.jpg", "caption": "a car", "split": "test"},
            {"image": "a.jpg", "caption": "a dog", "split": "train"},
            {"image": "val2014/c.jpg", "caption": "une voiture rouge ✓", "split": "test"}]
    table.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    tool = load_tool("convert_captions")
    out = tmp_path / "d.json"
    assert tool.main(["--input", str(table), "--output", str(out), "--image-root", str(image_root)]) == 0
    assert "total:       2 images        3 captions" in capsys.readouterr().out
    ds = load_karpathy(out, image_root)
    assert [(im.image_id, im.split, im.captions) for im in ds.images] == [
        ("c.jpg", "test", ("a car", "une voiture rouge ✓")), ("a.jpg", "train", ("a dog",))]
    # a failing conversion returns 1 and prints the error
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.jpg", "caption": "x", "split": "dev"}\n', encoding="utf-8")
    assert tool.main(["--input", str(bad), "--output", str(tmp_path / "e.json")]) == 1
    assert "bad.jsonl: line 1 (image 'a.jpg'): unknown split 'dev'" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("name, text, expect", [
    ("cols.csv", "image,text,split\na.jpg,x,train\n", r"cols\.csv: line 1: missing column\(s\) caption"),
    ("empty.csv", "image,caption,split\na.jpg,x,train\nb.jpg,  ,train\n",
     r"empty\.csv: line 3 \(image 'b\.jpg'\): empty or whitespace-only caption"),
    ("split.csv", "image,caption,split\na.jpg,x,train\na.jpg,y,dev\n",
     r"split\.csv: line 3 \(image 'a\.jpg'\): unknown split 'dev'"),
    ("two.csv", "image,caption,split\na.jpg,x,train\nb.jpg,y,val\na.jpg,z,test\n",
     r"two\.csv: line 4 \(image 'a\.jpg'\): image listed under split 'test' here but 'train' at line 2"),
    ("same_name.csv", "image,caption,split\nx/a.jpg,x,train\ny/a.jpg,y,train\n",
     r"same_name\.csv: line 3 \(image 'y/a\.jpg'\): file name 'a\.jpg' is also used by image 'x/a\.jpg'"),
    ("bad.jsonl", '{"image": "a.jpg", "caption": "x", "split": "train"}\n{"image": "b.jpg",\n',
     r"bad\.jsonl: line 2: malformed JSON"),
    ("keys.jsonl", '{"image": "a.jpg", "split": "train"}\n', r"keys\.jsonl: line 1: missing key\(s\) caption"),
    ("notstr.jsonl", '{"image": "a.jpg", "caption": 3, "split": "train"}\n',
     r"notstr\.jsonl: line 1 \(image 'a\.jpg'\): caption is not a string"),
])
def test_convert_errors_write_nothing(tmp_path, name, text, expect):
    table = tmp_path / name
    table.write_text(text, encoding="utf-8")
    out = tmp_path / "out.json"
    with pytest.raises(DatasetError, match=expect):
        convert_captions(table, out)
    assert not out.exists() and list(tmp_path.iterdir()) == [table]


def test_convert_missing_image_and_not_utf8(tmp_path, image_root):
    table = tmp_path / "caps.csv"
    table.write_text("image,caption,split\na.jpg,x,train\nnope.jpg,y,train\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"caps\.csv: line 3 \(image 'nope\.jpg'\): image file not found"):
        convert_captions(table, tmp_path / "o.json", image_root=image_root)
    table.write_bytes("image,caption,split\na.jpg,café,train\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"caps\.csv: not UTF-8 text .*line 2"):
        convert_captions(table, tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()
