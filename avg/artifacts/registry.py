"""The stage registry: the one place that names the pipeline's stages and their output folders.

Every stage of ``scripts/run_all.sh``, in pipeline order, with

* ``name`` -- run_all's name and its script, ``scripts/<name>.sh``;
* ``out`` -- its output folder under a run's stage root (``outputs/<dataset>/``), where its
  ``stage.json`` manifest lives; ``None`` for the demo tools (each keeps its own cache) and the
  report (always rerun, cheap);
* ``module`` -- the Python entry point the script runs: ``python -m avg.stages.<name>`` for every
  stage; the demo tools are files under ``tools/``, the report is ``avg.eval.report``;
* ``manifest`` -- the stage name the module records in ``stage.json`` (the names of the first
  release, kept so that existing outputs stay valid);
* ``var`` -- the shell variable the stage scripts use for the folder (``common.sh`` defines them
  all from here: ``python -m avg.artifacts.registry shell <stage root>``).

run_all, the stage scripts, the experiment grid, the seed runner, the report and the API read the
folders from here instead of spelling them. No I/O at import; no dependency on the rest of the
package.

    python -m avg.artifacts.registry names            # the stages, in order
    python -m avg.artifacts.registry out <stage>      # its output folder (relative to the stage root)
    python -m avg.artifacts.registry shell <root>     # VAR=<root>/<folder> lines for the shell
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Stage:
    name: str
    out: Optional[str]
    manifest: Optional[str] = None
    var: Optional[str] = None
    entry: Optional[str] = None  # the entry point of a tool or the report; a stage's is avg.stages.<name>

    @property
    def module(self) -> str:
        return self.entry or f"avg.stages.{self.name}"

    @property
    def script(self) -> str:
        return f"scripts/{self.name}.sh"

    @property
    def kind(self) -> str:
        """``tool`` (a demo asset builder with its own cache), ``report`` (always runs) or ``stage``."""
        if self.name.startswith("demo_"):
            return "tool"
        return "report" if self.out is None else "stage"


STAGES: tuple[Stage, ...] = (
    Stage("demo_assets", None, entry="tools/make_demo_assets.py"),
    Stage("prepare_emb", "emb", "prepare_emb", "EMB_DIR"),
    Stage("eval_clip_baseline", "clip_baseline", "clip_baseline", "CLIP_BASELINE_DIR"),
    Stage("train_rqvae", "rqvae", "train_rqvae", "RQVAE_DIR"),
    Stage("generate_codes", "codes", "generate_codes", "CODES_DIR"),
    Stage("prepare_retriever_dataset", "retriever_data", "prepare_retriever_dataset",
          "RETRIEVER_DATA_DIR"),
    Stage("demo_t5", None, entry="tools/make_demo_t5.py"),
    Stage("train_retriever_t5", "retriever_t5", "train_t5", "RETRIEVER_T5_DIR"),
    Stage("train_retriever_t5_stage2", "retriever_t5_stage2", "train_t5",
          "RETRIEVER_T5_STAGE2_DIR"),
    Stage("rerank_embed", "rerank_embed", "rerank_embed", "RERANK_EMBED_DIR"),
    Stage("demo_llama", None, entry="tools/make_demo_llama.py"),
    Stage("finetune_retriever_llama", "retriever_llama", "train_llama", "RETRIEVER_LLAMA_DIR"),
    Stage("test_retriever_llama", "retriever_llama/test", "test_llama",
          "RETRIEVER_LLAMA_TEST_DIR"),
    Stage("prepare_reranker_dataset", "reranker_data", "prepare_reranker_dataset",
          "RERANKER_DATA_DIR"),
    Stage("convert_voken_to_seed", "reranker_tokens", "convert_voken_to_seed",
          "RERANKER_TOKENS_DIR"),
    Stage("finetune_reranker_llama", "reranker", "finetune_reranker", "RERANKER_DIR"),
    Stage("test_reranker_llama", "reranker/test", "test_reranker", "RERANKER_TEST_DIR"),
    Stage("report", None, entry="avg.eval.report"),
)

_BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    """The stage called ``name``; a KeyError lists the known names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r} (stages: {' '.join(_BY_NAME)})") from None


def names() -> list[str]:
    return [s.name for s in STAGES]


def out(name: str) -> str:
    """The output folder of stage ``name``, relative to a stage root."""
    folder = stage(name).out
    if folder is None:
        raise KeyError(f"stage {name!r} has no output folder of its own")
    return folder


def out_dir(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / out(name)


def manifest_name(name: str) -> str:
    """The stage name the module of ``name`` writes into its stage.json."""
    m = stage(name).manifest
    if m is None:
        raise KeyError(f"stage {name!r} writes no manifest")
    return m


def shell_lines(root: str) -> list[str]:
    """``VAR=<root>/<folder>`` for every stage with a folder (quoted for the shell)."""
    return [f"{s.var}={shlex.quote(str(Path(root) / s.out) if root else s.out)}" for s in STAGES if s.var]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m avg.artifacts.registry names | out <stage> | shell <stage root>"
    if not argv or argv[0] not in ("names", "out", "shell") or (argv[0] != "names" and len(argv) != 2):
        print(usage, file=sys.stderr)
        return 2
    try:
        if argv[0] == "names":
            print("\n".join(names()))
        elif argv[0] == "out":
            print(out(argv[1]))
        else:
            print("\n".join(shell_lines(argv[1])))
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["STAGES", "Stage", "manifest_name", "names", "out", "out_dir", "shell_lines", "stage"]
