"""Compare the numbers of two runs' stage roots, e.g. the same demo before and after a change of code.

    python tools/compare_runs.py outputs_old/demo outputs/demo

For every stage folder of the registry it reads every ``*.json`` and ``*.jsonl`` file of the first
root and the same file of the second, and compares every number in them and the results (ranked and
gold image ids, queries); timings (keys with ``time``, ``seconds``, ``per_s``, ``ms_per``, ``_s``), run ids,
wandb folders and checkpoints are left out. Prints one line per difference (the first 30) and a summary;
exits 1 when any number differs or a file is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avg.artifacts.registry import STAGES  # noqa: E402

SKIP_PARTS = {"wandb", "checkpoints"}
SKIP_FILES = {"stage.json", "train_state.json"}


def _timing(key: str) -> bool:
    return key == "run_id" or any(s in key for s in ("time", "seconds", "per_s", "ms_per")) or key.endswith("_s")


#: string fields that are results (ranked image ids, gold ids, queries), compared like the numbers
RESULT_KEYS = {"ranked", "gold", "image_id", "query", "qid"}


def numbers(obj, prefix: str = "", result: bool = False):
    """(path, value) for every number in a json value, and every string of a result field; timings left out."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not _timing(str(k)):
                yield from numbers(v, f"{prefix}/{k}", str(k) in RESULT_KEYS)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{prefix}[{i}]", result)
    elif (isinstance(obj, (int, float)) and not isinstance(obj, bool)) or (result and isinstance(obj, str)):
        yield prefix, obj


def _same(x, y) -> bool:
    return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))


def _records(path: Path) -> list[dict]:
    """The values of each record of a json (one record) or jsonl file; a ValueError naming the file and line."""
    text = path.read_text()
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()] if path.suffix == ".jsonl" else [(1, text)]
    try:
        return [dict(numbers(json.loads(line))) for _, line in lines]
    except json.JSONDecodeError as e:
        bad = next(i for i, line in lines if not _parses(line))
        raise ValueError(f"{path}: line {bad} is not valid JSON ({e.msg})") from None


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def compare(a: Path, b: Path) -> tuple[int, int, list[str]]:
    """(files compared, values compared, differences) between stage roots ``a`` and ``b``."""
    files = values = 0
    diffs: list[str] = []
    for stage in STAGES:
        if stage.out is None:
            continue
        fa, fb = a / stage.out, b / stage.out
        if not fa.is_dir():
            continue
        for path in sorted(p for p in fa.rglob("*.json*") if p.suffix in (".json", ".jsonl")):
            rel = path.relative_to(fa)
            if SKIP_PARTS & set(rel.parts) or path.name in SKIP_FILES:
                continue
            other = fb / rel
            if not other.is_file():
                diffs.append(f"{other}: missing (it is {path} in the first run)")
                continue
            ra, rb = _records(path), _records(other)
            files += 1
            values += sum(len(r) for r in ra)
            if len(ra) != len(rb):
                diffs.append(f"{path} vs {other}: {len(ra)} records vs {len(rb)}")
                continue
            for i, (x, y) in enumerate(zip(ra, rb)):
                for key in sorted(x.keys() | y.keys()):
                    if not _same(x.get(key), y.get(key)):
                        where = f"{path}" + (f" line {i + 1}" if path.suffix == ".jsonl" else "")
                        diffs.append(f"{where} {key}: {x.get(key)} vs {y.get(key)}")
    return files, values, diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", type=Path, help="a stage root (outputs/<dataset>)")
    p.add_argument("second", type=Path, help="another stage root")
    args = p.parse_args(argv)
    for root in (args.first, args.second):
        if not root.is_dir():
            print(f"error: {root}: not a folder", file=sys.stderr)
            return 2
    try:
        files, values, diffs = compare(args.first, args.second)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in diffs[:30]:
        print(line)
    print(f"{files} files, {values} values compared: {len(diffs)} differences")
    return 1 if diffs or files == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
