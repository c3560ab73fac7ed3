"""Checks of a rehearsal run (``scripts/rehearse.sh``): the real configs' pipeline on stand-ins, one process and two.

    python -m avg.experiments.rehearsal check outputs/rehearsal/paper-1p/flickr30k --recipe paper --processes 1
    python -m avg.experiments.rehearsal compare <one-process root> <its models evaluated by two processes>

``check``: every stage of the registry finished (``stage.json`` complete) under the named recipe; the results
table has one row per system and split; the efficiency benchmark wrote its table; with two processes, every
trainer's log says it trained as two.
``compare``: the one-process run's trained retrievers and reranker, evaluated again by two processes (sharded,
gathered), rank every query the same, with the same scores (to ``--score-tol``; in float32 they are the same
to the last digits, while bf16 scores move with the batch a query is padded in and beam pruning follows them).
Each prints what it checked and exits 1 naming the first files that fail.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avg.artifacts.registry import STAGES
from avg.artifacts.runfiles import read_run

SCORE_TOL = 1e-4
#: trainers whose log states the process count ("... x N process(es) ...")
TRAINERS = ("train_retriever_t5", "train_retriever_t5_stage2", "finetune_retriever_llama", "finetune_reranker_llama")
#: (folder under the one-process root, the same file under the two-process evaluation root)
EVALUATED_TWICE = ("train_retriever_t5_stage2/eval/run_test.jsonl", "test_retriever_llama/run_test.jsonl",
                   "test_reranker_llama/run_test.jsonl")


def check_run(root: Path, recipe: str, processes: int) -> list[str]:
    problems = []
    for st in STAGES:
        if st.kind != "stage":
            continue
        path = root / st.out / "stage.json"
        if not path.is_file():
            problems.append(f"{path}: missing (stage {st.name} did not run)")
            continue
        m = json.loads(path.read_text(encoding="utf-8"))
        if m.get("status") != "complete":
            problems.append(f"{path}: status {m.get('status')!r}, not complete")
        if m.get("recipe") != recipe:
            problems.append(f"{path}: recipe {m.get('recipe')!r}, expected {recipe!r}")
    results = root / "results.csv"
    if not results.is_file():
        problems.append(f"{results}: missing (the report did not run)")
    else:
        import pandas as pd

        df = pd.read_csv(results)
        dup = df[df.duplicated(subset=["system", "split"], keep=False)]
        if len(dup):
            problems.append(f"{results}: systems reported twice: {sorted(set(dup['system']))}")
    if not (root / "efficiency" / "efficiency.csv").is_file():
        problems.append(f"{root / 'efficiency' / 'efficiency.csv'}: missing (the efficiency benchmark did not run)")
    if processes > 1:
        for name in TRAINERS:
            log = root / name / "train.log"
            if log.is_file() and f"x {processes} process(es)" not in log.read_text(encoding="utf-8"):
                problems.append(f"{log}: does not say it trained on {processes} processes")
    return problems


def same_ranking(x, y, tol: float, rtol: float = 0.0) -> bool:
    """Two rankings of one query agree: every image both return has the same score (within ``tol`` + ``rtol``
    x its size), and an image only one returns sits at the other's boundary (its score that close to the other's
    last) -- under bf16 the scores of one model move in the third significant digit with the batch a query is
    padded in, and near-ties swap."""
    sx, sy = dict(zip(x.ranked, map(float, x.scores))), dict(zip(y.ranked, map(float, y.scores)))
    close = lambda a, b: abs(a - b) <= tol + rtol * max(abs(a), abs(b))  # noqa: E731
    if not all(close(sx[i], sy[i]) for i in sx.keys() & sy.keys()):
        return False
    tail_x, tail_y = min(sx.values(), default=0.0), min(sy.values(), default=0.0)
    return (all(close(sx[i], tail_y) for i in sx.keys() - sy.keys())
            and all(close(sy[i], tail_x) for i in sy.keys() - sx.keys()))


def compare_runs(one: Path, side: Path, tol: float = SCORE_TOL, rtol: float = 0.0) -> tuple[list[str], dict]:
    """Problems, and per run file the number of queries compared and of those ranked identically. ``side``: the
    two-process evaluation of ``one``'s models."""
    problems, counts = [], {}
    for rel in EVALUATED_TWICE:
        a, b = one / rel, side / rel
        if not (a.is_file() and b.is_file()):
            problems.append(f"{a if not a.is_file() else b}: missing")
            continue
        ra, rb = {r.qid: r for r in read_run(a)}, {r.qid: r for r in read_run(b)}
        if set(ra) != set(rb):
            problems.append(f"{b}: {len(rb)} queries, {a}: {len(ra)} (different query sets)")
            continue
        bad = [qid for qid in ra if not same_ranking(ra[qid], rb[qid], tol, rtol)]
        if bad:
            x, y = ra[bad[0]], rb[bad[0]]
            problems.append(f"{b}: {len(bad)} of {len(ra)} queries ranked differently from {a} beyond score "
                            f"tolerance {tol:g} + {rtol:g} x |score|, e.g. query {bad[0]!r}: {list(zip(y.ranked, y.scores))[:4]} by two "
                            f"processes, {list(zip(x.ranked, x.scores))[:4]} by one")
        counts[rel] = (len(ra), sum(ra[q].ranked == rb[q].ranked for q in ra))
    return problems, counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="one rehearsal run's outputs are complete")
    c.add_argument("root", type=Path, help="stage root of the run (OUT_DIR/DATASET)")
    c.add_argument("--recipe", required=True, help="the recipe it ran")
    c.add_argument("--processes", type=int, default=1, help="processes it trained with")
    c = sub.add_parser("compare", help="two processes against one")
    c.add_argument("one", type=Path, help="stage root of the one-process run")
    c.add_argument("side", type=Path, help="root of the two-process evaluation of the one-process run's models")
    c.add_argument("--score-tol", type=float, default=SCORE_TOL,
                   help="largest score difference of an image both rank, plus --score-rtol x its size")
    c.add_argument("--score-rtol", type=float, default=0.0, help="relative part of the tolerance (bf16 runs: 0.01)")
    args = p.parse_args(argv)
    if args.command == "check":
        problems = check_run(args.root, args.recipe, args.processes)
        done = f"{args.root}: every stage complete under recipe {args.recipe}, one row per system, efficiency table"
    else:
        problems, counts = compare_runs(args.one, args.side, args.score_tol, args.score_rtol)
        done = (f"{args.one}: its models evaluated by two "
                "processes rank as by one (" + ", ".join(f"{rel}: {same} of {n} queries ranked identically"
                                                        for rel, (n, same) in counts.items())
                + f"; scores within {args.score_tol:g}" + (f" + {args.score_rtol:g} x |score|)" if args.score_rtol else ")"))
    for line in problems[:20]:
        print(f"error: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"[rehearsal] ok: {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
