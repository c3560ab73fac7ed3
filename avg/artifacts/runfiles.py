"""Run files: the one format for every ranked result (retriever, reranker, CLIP baseline).

jsonl, one line per query: ``{"qid", "query", "gold", "ranked": [image ids], "scores": [...]}``.
``gold`` is the image id the query was written for (a list is accepted for multi-positive sets).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

from avg.core.io import InputError, atomic_open, iter_jsonl

Gold = Union[str, Sequence[str]]


@dataclass
class RunRecord:
    qid: Union[int, str]
    query: str
    gold: Gold
    ranked: list = field(default_factory=list)
    scores: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"qid": self.qid, "query": self.query, "gold": self.gold, "ranked": list(self.ranked), "scores": [float(s) for s in self.scores]}


def write_run(records: Iterable[Union[RunRecord, dict]], path: Union[str, os.PathLike]) -> int:
    n = 0
    with atomic_open(path) as f:
        for rec in records:
            obj = rec.to_json() if isinstance(rec, RunRecord) else rec
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_run(path: Union[str, os.PathLike]) -> list[RunRecord]:
    out = []
    for lineno, obj in iter_jsonl(path, "run file"):
        try:
            rec = RunRecord(qid=obj["qid"], query=obj.get("query", ""), gold=obj["gold"], ranked=list(obj["ranked"]),
                            scores=list(obj.get("scores", [])))
        except (KeyError, TypeError) as e:
            raise InputError(f"{path}: line {lineno}: not a run record ({e})") from None
        if rec.scores and len(rec.scores) != len(rec.ranked):
            raise InputError(f"{path}: line {lineno}: {len(rec.ranked)} ranked ids but {len(rec.scores)} scores")
        out.append(rec)
    return out


def retriever_run_files(retriever_dir: Union[str, os.PathLike], splits) -> dict:
    """Run files a retriever trainer left next to its ``best/`` folder: ``eval/run_test.jsonl`` and
    ``eval/run_val_epoch<e>.jsonl`` of the best epoch (``best/best.json``), for the splits that have one."""
    from avg.core.io import read_json

    best = Path(retriever_dir)
    eval_dir = best.parent / "eval"
    found = {}
    if "test" in splits and (eval_dir / "run_test.jsonl").is_file():
        found["test"] = str(eval_dir / "run_test.jsonl")
    epoch = read_json(best / "best.json").get("epoch") if (best / "best.json").is_file() else None
    if "val" in splits and epoch is not None and (eval_dir / f"run_val_epoch{epoch}.jsonl").is_file():
        found["val"] = str(eval_dir / f"run_val_epoch{epoch}.jsonl")
    return found
