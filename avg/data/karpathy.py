"""Karpathy-format caption datasets (`dataset_flickr30k.json`, `dataset_coco.json`): reader and validator.

The split files of Karpathy & Fei-Fei are the common currency of Flickr30K / MS-COCO retrieval
work, so every dataset enters the pipeline in this shape:

    {"images": [{"filename": "1000092795.jpg", "filepath": "val2014" (optional),
                 "split": "train" | "val" | "test" | "restval",
                 "sentences": [{"raw": "Two young guys ..."}, ...]}, ...], ...}

`load_karpathy` checks the whole file and reports every problem it finds (up to a cap) in one
`DatasetError`, so a user can fix a broken file in one pass instead of one error per run.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from avg.core.io import InputError

SPLITS = ("train", "val", "test")
# COCO's Karpathy split has a "restval" part (the rest of val2014) that everyone trains on.
SPLIT_ALIASES = {"train": "train", "val": "val", "test": "test", "restval": "train"}
MAX_REPORTED_PROBLEMS = 20
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize_caption(text: str) -> list[str]:
    """Lower-cased word tokens, like the `tokens` field of the original Karpathy files."""
    return _TOKEN_RE.findall(text.lower())


class DatasetError(InputError):
    """A caption dataset file is malformed; the message names the file and each bad record."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: str                # the image's `filename`, unique within a dataset
    path: Path                   # image_root / filepath / filename
    rel_path: str                # filepath/filename as written in the json
    split: str                   # train | val | test ("restval" counts as train)
    orig_split: str              # the split as written in the json
    captions: tuple[str, ...]    # sentences[].raw, stripped


@dataclass
class CaptionDataset:
    source: Path
    image_root: Path
    images: list[ImageRecord]

    def split(self, name: str) -> list[ImageRecord]:
        """Images of one split, in file order (`restval` images are in "train")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r} (expected one of {', '.join(SPLITS)})")
        return [im for im in self.images if im.split == name]

    def counts(self) -> dict:
        """{"train": {"images": n, "captions": m}, "val": ..., "test": ..., "total": ...}."""
        out = {s: {"images": 0, "captions": 0} for s in (*SPLITS, "total")}
        for im in self.images:
            for key in (im.split, "total"):
                out[key]["images"] += 1
                out[key]["captions"] += len(im.captions)
        return out

    def __len__(self) -> int:
        return len(self.images)


class Problems:
    """Collects validation problems; keeps the first `cap` messages and counts the rest."""

    def __init__(self, source: str, cap: int = MAX_REPORTED_PROBLEMS):
        self.source, self.cap, self.messages, self.total = source, cap, [], 0

    def add(self, msg: str) -> None:
        self.total += 1
        if len(self.messages) < self.cap:
            self.messages.append(msg)

    def raise_if_any(self) -> None:
        if not self.total:
            return
        lines = [f"{self.source}: {m}" for m in self.messages]
        if self.total > len(self.messages):
            lines.append(f"... and {self.total - len(self.messages)} more problem(s) not shown")
        head = f"{self.source}: {self.total} problem(s) in caption dataset:\n" if self.total > 1 else ""
        raise DatasetError(head + "\n".join(lines))


def _read_json_file(json_path: Path) -> Any:
    if not json_path.is_file():
        raise DatasetError(f"{json_path}: file not found")
    raw = json_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DatasetError(
            f"{json_path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}, offset {e.start}); "
            "re-save the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _record_label(i: int, rec: Any) -> str:
    name = rec.get("filename") if isinstance(rec, dict) else None
    return f"images[{i}] (filename {name!r})" if isinstance(name, str) and name else f"images[{i}]"



def path_escape(*parts: str) -> Optional[str]:
    """Why ``parts`` joined under an image root would name a file outside it ('absolute path ...',
    '... goes above the root'), or None when it stays inside. Lexical, before anything is opened:
    an absolute part, a drive letter, or more '..' than folders above them."""
    joined = "/".join(p for p in parts if p)
    for part in parts:
        if part and (part.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", part)):
            return f"{joined!r} is absolute"
    depth = 0
    for piece in re.split(r"[/\\]+", joined):
        if piece == "..":
            depth -= 1
            if depth < 0:
                return f"{joined!r} goes above the root ('..')"
        elif piece not in ("", "."):
            depth += 1
    return None


def validate_karpathy(data: Any, source: str | os.PathLike, image_root: str | os.PathLike, *,
                      check_files: bool = True) -> CaptionDataset:
    """Validate an already-parsed Karpathy dict; `source` names the file in error messages."""
    source, image_root = Path(source), Path(image_root)
    problems = Problems(str(source))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        got = type(data).__name__ if not isinstance(data, dict) else (
            "no 'images' key" if "images" not in data else f"'images' is a {type(data['images']).__name__}")
        raise DatasetError(f"{source}: expected a JSON object with an 'images' list ({got})")
    if not data["images"]:
        raise DatasetError(f"{source}: the 'images' list is empty")
    if check_files and not image_root.is_dir():
        raise DatasetError(f"{source}: image root {image_root} is not a directory "
                           "(pass the folder the json's filepath/filename are relative to)")

    images: list[ImageRecord] = []
    first_seen: dict[str, int] = {}
    for i, rec in enumerate(data["images"]):
        label = _record_label(i, rec)
        if not isinstance(rec, dict):
            problems.add(f"{label}: expected an object, got {type(rec).__name__}")
            continue
        ok = True
        filename = rec.get("filename")
        if not isinstance(filename, str) or not filename.strip():
            problems.add(f"{label}: missing or empty 'filename'")
            ok = False
        elif filename in first_seen:
            problems.add(f"{label}: duplicate filename {filename!r} "
                         f"(also images[{first_seen[filename]}]); image ids must be unique")
            ok = False
        else:
            first_seen[filename] = i
        filepath = rec.get("filepath", "")
        if filepath is None:
            filepath = ""
        if not isinstance(filepath, str):
            problems.add(f"{label}: 'filepath' must be a string, got {type(filepath).__name__}")
            ok = False
        orig_split = rec.get("split")
        if orig_split not in SPLIT_ALIASES:
            problems.add(f"{label}: unknown split {orig_split!r} (expected train/val/test/restval)")
            ok = False

        captions = []
        sentences = rec.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            problems.add(f"{label}: no sentences (each image needs at least one caption)")
            ok = False
        else:
            for j, sent in enumerate(sentences):
                raw = sent.get("raw") if isinstance(sent, dict) else sent
                if isinstance(sent, dict) and "raw" not in sent:
                    problems.add(f"{label}: sentences[{j}] has no 'raw' caption")
                    ok = False
                elif not isinstance(raw, str):
                    problems.add(f"{label}: sentences[{j}] caption is not a string "
                                 f"(got {type(raw).__name__}: {str(raw)[:40]!r})")
                    ok = False
                elif not raw.strip():
                    problems.add(f"{label}: sentences[{j}] caption is empty or whitespace-only")
                    ok = False
                else:
                    captions.append(raw.strip())
        if not ok:
            continue

        rel_path = f"{filepath.strip('/')}/{filename}" if filepath.strip("/") else filename
        escape = path_escape(filepath, filename)
        if escape:
            problems.add(f"{label}: image path {escape}, outside the image root {image_root}; "
                         "'filepath'/'filename' must name a file inside it")
            continue
        path = image_root / rel_path
        if check_files and not path.is_file():
            problems.add(f"{label}: image file not found: {path}")
            continue
        images.append(ImageRecord(image_id=filename, path=path, rel_path=rel_path,
                                  split=SPLIT_ALIASES[orig_split], orig_split=orig_split,
                                  captions=tuple(captions)))
    problems.raise_if_any()
    return CaptionDataset(source=source, image_root=image_root, images=images)


def load_karpathy(json_path: str | os.PathLike, image_root: str | os.PathLike, *,
                  check_files: bool = True) -> CaptionDataset:
    """Read and validate a Karpathy split file; raise `DatasetError` listing every problem found."""
    json_path = Path(json_path)
    return validate_karpathy(_read_json_file(json_path), json_path, image_root, check_files=check_files)
