"""The ``avg`` command (``python -m avg`` is the same): ``avg search`` ranks images for text queries from a trained run.

    avg search --run outputs/demo "a tiny blue hexagon" --k 5
    avg search --run outputs/demo --json --queries-file queries.txt     # one query per line
    printf 'a red circle\\na big green star\\n' | avg search --run outputs/demo --rerank embed

``avg search`` prints per query its ranked images (rank, score, image id, image file); ``--json`` prints one JSON
document ``[{"query", "hits": [{"rank", "image_id", "image_path", "score"}]}]`` for scripts. An empty
query, a run without a trained retriever or a gallery of other codes ends with a one-line ``error:``
and exit status 2. Queries are read from stdin only when it is piped (or with ``--queries-file -``):
the command never waits on a terminal.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from avg.core.io import InputError


def build_parser() -> argparse.ArgumentParser:
    """``avg`` with its subcommands (one today: ``search``)."""
    top = argparse.ArgumentParser(prog="avg", description="AVG: text-to-image retrieval as token-to-voken generation. "
                                  "The stages run from scripts/ (README); this command queries a trained run.")
    top.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = top.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("search", help="ranked images for text queries from a trained run",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("queries", nargs="*", help="query texts (else --queries-file, else stdin when it is not a terminal)")
    p.add_argument("--run", required=True, help="a run's output folder (outputs/<dataset>), a retriever stage folder or its best/")
    p.add_argument("--stage", default=None, help="retriever stage folder to load (default: train_retriever_t5_stage2, else train_retriever_t5)")
    p.add_argument("--k", type=int, default=10, help="images per query")
    p.add_argument("--gallery", default="test", help="a split (train/val/test), a codes folder or a gallery json")
    p.add_argument("--queries-file", default=None, help="one query per line ('-': stdin)")
    p.add_argument("--rerank", choices=("embed", "lm"), default=None,
                   help="re-score the top-k: embed (the rerank_embed stage's CLIP cosine) or lm (the trained LM reranker)")
    p.add_argument("--reranker", default=None, help="a saved LM reranker for --rerank lm (default: the run's finetune_reranker_llama/best)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--num-beams", type=int, default=None, help="beam width (default: the one the stage evaluated with)")
    p.add_argument("--batch-size", type=int, default=None, help="queries per search batch (default: the stage's)")
    p.add_argument("--image-root", default=None, help="folder the image files are under (default: the one prepare_emb/ was built from)")
    return top


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("avg")  # the installed distribution's (pyproject.toml); avg/__init__ sits above this layer
    except PackageNotFoundError:
        return "unknown (avg is not installed: bash scripts/bootstrap.sh)"


def read_queries(args, stdin=None) -> list[str]:
    """The queries of the command line, of --queries-file, or of stdin; errors name the source and line."""
    stdin = sys.stdin if stdin is None else stdin  # headless-ok: piped queries only, never a prompt
    if args.queries and args.queries_file:
        raise InputError("give queries as arguments or with --queries-file, not both")
    if args.queries:
        for n, q in enumerate(args.queries, 1):
            if not q.strip():
                raise InputError(f"query {n} on the command line is empty")
        return list(args.queries)
    if args.queries_file and args.queries_file != "-":
        path = Path(args.queries_file)
        if not path.is_file():
            raise InputError(f"{path}: queries file not found")
        lines, source = path.read_text(encoding="utf-8").splitlines(), str(path)
    elif args.queries_file == "-" or not stdin.isatty():
        lines, source = stdin.read().splitlines(), "stdin"
    else:
        raise InputError("no query: give one as an argument, with --queries-file FILE, or on stdin")
    for n, q in enumerate(lines, 1):
        if not q.strip():
            raise InputError(f"{source}: line {n}: empty query")
    if not lines:
        raise InputError(f"{source}: no queries")
    return lines


def format_table(queries: Sequence[str], hits: Sequence[list]) -> str:
    out = []
    for n, (q, hs) in enumerate(zip(queries, hits), 1):
        out.append(f"query {n}: {q}")
        for rank, h in enumerate(hs, 1):
            out.append(f"  {rank:3d}  {h.score:9.4f}  {h.image_id}  {h.image_path or '-'}")
    return "\n".join(out)


def to_json(queries: Sequence[str], hits: Sequence[list]) -> list:
    return [{"query": q, "hits": [{"rank": r, "image_id": h.image_id, "image_path": h.image_path, "score": h.score}
                                  for r, h in enumerate(hs, 1)]} for q, hs in zip(queries, hits)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return search(args)


def search(args) -> int:
    """``avg search``."""
    if args.k < 1:
        raise InputError(f"--k must be >= 1, got {args.k}")
    queries = read_queries(args)
    from transformers.utils import logging as hf_logging

    from avg.api import Retriever

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    retriever = Retriever.from_run(args.run, stage=args.stage, gallery=args.gallery, device=args.device,
                                   num_beams=args.num_beams, batch_size=args.batch_size, image_root=args.image_root,
                                   reranker=args.reranker)
    hits = retriever.search(queries, k=args.k, rerank=args.rerank, show_progress=len(queries) > 100 and sys.stderr.isatty())
    if args.json:
        json.dump(to_json(queries, hits), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_table(queries, hits))
    return 0


def console_main() -> None:
    """The ``avg`` console script (pyproject.toml): bad input ends with one ``error:`` line and status 2."""
    from avg.core.cli import run_main

    run_main(main)
