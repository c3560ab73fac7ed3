"""Convert a flat caption table (CSV or JSONL, one row per caption) into a Karpathy split file.

Most home-made caption sets are a table `image,caption,split`; the pipeline reads Karpathy json,
so this groups rows by image (in order of first appearance) and writes that format, after
checking every row. Nothing is written unless the whole input is valid.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from avg.data.karpathy import (MAX_REPORTED_PROBLEMS, SPLIT_ALIASES, DatasetError, Problems, path_escape,
                               tokenize_caption, validate_karpathy)
from avg.core.io import write_json

REQUIRED_COLUMNS = ("image", "caption", "split")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DatasetError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}); "
                           "re-save the file as UTF-8") from None


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DatasetError(f"{path}: line 1: missing column(s) {', '.join(missing)} "
                           f"(header is {header}; expected {', '.join(REQUIRED_COLUMNS)})")
    reader.fieldnames = header
    line = reader.line_num + 1
    for row in reader:
        yield line, row           # a quoted caption may span lines: report where the row starts
        line = reader.line_num + 1


def _jsonl_rows(path: Path, text: str, problems: Problems) -> Iterator[tuple[int, dict]]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.add(f"line {lineno}: malformed JSON at column {e.colno}: {e.msg}")
            continue
        if not isinstance(row, dict):
            problems.add(f"line {lineno}: expected a JSON object, got {type(row).__name__}")
            continue
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            problems.add(f"line {lineno}: missing key(s) {', '.join(missing)}")
            continue
        yield lineno, row


def table_to_karpathy(input_path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                      dataset_name: str | None = None) -> dict[str, Any]:
    """Parse and validate a caption table; return the Karpathy dict. Raises DatasetError listing all problems."""
    path = Path(input_path)
    text = _read_text(path)
    problems = Problems(str(path), cap=MAX_REPORTED_PROBLEMS)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(path, text)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path, text, problems)
    else:
        raise DatasetError(f"{path}: unknown table format {suffix!r} (expected .csv or .jsonl)")

    images: dict[str, dict] = {}          # image path as written -> Karpathy record
    first_line: dict[str, int] = {}
    by_filename: dict[str, str] = {}      # Karpathy image ids are file names: they must be unique
    n_sent = 0
    for lineno, row in rows:
        image, caption, split = (row.get(c) for c in REQUIRED_COLUMNS)
        where = f"line {lineno}"
        if not isinstance(image, str) or not image.strip():
            problems.add(f"{where}: empty or missing image path")
            continue
        image = image.strip().replace("\\", "/")
        where = f"line {lineno} (image {image!r})"
        bad = False
        if caption is None:
            problems.add(f"{where}: missing caption (row has too few columns)")
            bad = True
        elif not isinstance(caption, str):
            problems.add(f"{where}: caption is not a string (got {type(caption).__name__})")
            bad = True
        elif not caption.strip():
            problems.add(f"{where}: empty or whitespace-only caption")
            bad = True
        split = split.strip() if isinstance(split, str) else split
        if split not in SPLIT_ALIASES:
            problems.add(f"{where}: unknown split {split!r} (expected train/val/test/restval)")
            bad = True
        elif image in images and images[image]["split"] != split:
            problems.add(f"{where}: image listed under split {split!r} here but "
                         f"{images[image]['split']!r} at line {first_line[image]}")
            bad = True
        if bad:
            continue
        escape = path_escape(image) if image not in images else None
        if escape:
            problems.add(f"{where}: image path {escape}, outside the image root; it must name a file inside it")
            continue
        if image not in images:
            pp = PurePosixPath(image)
            filename, filepath = pp.name, str(pp.parent) if str(pp.parent) != "." else ""
            if filename in by_filename:
                other = by_filename[filename]
                problems.add(f"{where}: file name {filename!r} is also used by image {other!r} "
                             f"(line {first_line[other]}); image ids are file names and must be unique")
                continue
            if image_root is not None and not (Path(image_root) / image).is_file():
                problems.add(f"{where}: image file not found: {Path(image_root) / image}")
                continue
            rec = {"filename": filename, "imgid": len(images), "split": split,
                   "sentences": [], "sentids": []}
            if filepath:
                rec["filepath"] = filepath
            images[image], first_line[image], by_filename[filename] = rec, lineno, image
        rec = images[image]
        raw = caption.strip()
        rec["sentences"].append({"raw": raw, "tokens": tokenize_caption(raw),
                                 "imgid": rec["imgid"], "sentid": n_sent})
        rec["sentids"].append(n_sent)
        n_sent += 1
    if not problems.total and not images:
        problems.add("no caption rows found")
    problems.raise_if_any()
    return {"images": list(images.values()), "dataset": dataset_name or path.stem}


def convert_captions(input_path: str | os.PathLike, output_path: str | os.PathLike, *,
                     image_root: str | os.PathLike | None = None, dataset_name: str | None = None) -> dict:
    """Convert a CSV/JSONL caption table to a Karpathy json at `output_path` (atomic); return split counts."""
    data = table_to_karpathy(input_path, image_root=image_root, dataset_name=dataset_name)
    # Re-check with the reader every later stage uses, so the output is known to load.
    ds = validate_karpathy(data, input_path, image_root if image_root is not None else ".",
                           check_files=image_root is not None)
    write_json(data, output_path, indent=None)
    return ds.counts()
