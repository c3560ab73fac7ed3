import os

import numpy as np
import pytest

from avg.core.io import InputError, atomic_dir, atomic_open, read_json, read_jsonl, save_npy, write_json, write_jsonl


def test_atomic_open_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write("partial")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_open_keeps_old_file_until_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write("new")
            raise RuntimeError
    assert target.read_text() == "old"
    with atomic_open(target) as f:
        f.write("new")
    assert target.read_text() == "new"


def test_json_and_jsonl_round_trip(tmp_path):
    write_json({"a": [1, 2], "b": "é"}, tmp_path / "x.json")
    assert read_json(tmp_path / "x.json") == {"a": [1, 2], "b": "é"}
    assert write_jsonl([{"i": i} for i in range(3)], tmp_path / "x.jsonl") == 3
    assert read_jsonl(tmp_path / "x.jsonl") == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.json: file not found"):
        read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\n "b": }')
    with pytest.raises(InputError, match=r"bad.json: malformed JSON at line 2"):
        read_json(bad)
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"a": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(InputError, match="latin.json: not UTF-8"):
        read_json(latin)
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"a": 1}\n{oops}\n')
    with pytest.raises(InputError, match="bad.jsonl: line 2"):
        read_jsonl(jl)


def test_save_npy_is_memmappable(tmp_path):
    arr = np.arange(12, dtype=np.float16).reshape(3, 4)
    save_npy(arr, tmp_path / "a.npy")
    loaded = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, arr)


def test_atomic_dir_replaces_whole_directory_only_on_success(tmp_path):
    target = tmp_path / "stage"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as d:
            (d / "b.txt").write_text("2")
            raise KeyboardInterrupt
    assert sorted(os.listdir(target)) == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]
    with atomic_dir(target) as d:
        (d / "c.txt").write_text("3")
    assert sorted(os.listdir(target)) == ["c.txt"]


def test_atomic_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json({}, tmp_path / "a.json")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
