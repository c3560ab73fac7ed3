"""The stage registry: the one place that names the pipeline's stages and their output folders.

A stage has one name. ``scripts/<name>.sh`` runs ``python -m avg.stages.<name>``, which writes its
outputs and its ``stage.json`` manifest (``"stage": "<name>"``) into ``<stage root>/<name>/``, where
the stage root is a run's ``outputs/<dataset>/``. ``STAGES`` lists them in the order of
``scripts/run_all.sh``, each with

* ``var`` -- the shell variable of its folder (``common.sh`` defines them all from here:
  ``python -m avg.artifacts.registry shell <stage root>``);
* ``inputs`` -- the stages whose outputs it reads (the rerank stages also read the retriever that
  ``RERANK_RETRIEVER`` names, by default ``train_retriever_t5_stage2``); a test checks every stage
  script against them;

The demo tools (``demo_*``, files under ``tools/`` with caches of their own) and the report (always
rerun, cheap) have no folder. run_all, the stage scripts, the experiment grid, the seed runner, the
report and the API read the folders from here instead of spelling them. No I/O at import; no
dependency on the rest of the package.

    python -m avg.artifacts.registry names            # the stages, in order
    python -m avg.artifacts.registry show             # the stages with their folders, variables and inputs
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

MANIFEST = "stage.json"  # = avg.core.stages.MANIFEST (a test checks); the shell runs this module, so it imports nothing heavy


@dataclass(frozen=True)
class Stage:
    name: str
    var: Optional[str] = None  # None: a demo tool or the report, with no folder
    inputs: tuple[str, ...] = ()
    entry: Optional[str] = None  # the entry point of a tool or the report; a stage's is avg.stages.<name>

    @property
    def kind(self) -> str:
        """``tool`` (a demo asset builder with its own cache), ``report`` (always runs) or ``stage``."""
        if self.name.startswith("demo_"):
            return "tool"
        return "stage" if self.var else "report"

    @property
    def out(self) -> Optional[str]:
        """The output folder, relative to a stage root: the stage's name."""
        return self.name if self.kind == "stage" else None

    @property
    def module(self) -> str:
        return self.entry or f"avg.stages.{self.name}"

    @property
    def script(self) -> str:
        return f"scripts/{self.name}.sh"


STAGES: tuple[Stage, ...] = (
    Stage("demo_assets", entry="tools/make_demo_assets.py"),
    Stage("prepare_emb", "EMB_DIR"),
    Stage("eval_clip_baseline", "CLIP_BASELINE_DIR", ("prepare_emb",)),
    Stage("train_rqvae", "RQVAE_DIR", ("prepare_emb",)),
    Stage("generate_codes", "CODES_DIR", ("train_rqvae", "prepare_emb")),
    Stage("prepare_retriever_dataset", "RETRIEVER_DATA_DIR", ("generate_codes", "prepare_emb")),
    Stage("demo_t5", entry="tools/make_demo_t5.py"),
    Stage("train_retriever_t5", "RETRIEVER_T5_DIR", ("prepare_retriever_dataset", "generate_codes")),
    Stage("train_retriever_t5_stage2", "RETRIEVER_T5_STAGE2_DIR", ("prepare_retriever_dataset", "train_retriever_t5")),
    Stage("rerank_embed", "RERANK_EMBED_DIR", ("prepare_retriever_dataset", "prepare_emb")),
    Stage("demo_llama", entry="tools/make_demo_llama.py"),
    Stage("finetune_retriever_llama", "RETRIEVER_LLAMA_DIR", ("prepare_retriever_dataset", "generate_codes")),
    Stage("test_retriever_llama", "RETRIEVER_LLAMA_TEST_DIR", ("finetune_retriever_llama", "prepare_retriever_dataset")),
    Stage("prepare_reranker_dataset", "RERANKER_DATA_DIR", ("prepare_retriever_dataset", "prepare_emb")),
    Stage("convert_voken_to_seed", "RERANKER_TOKENS_DIR", ("generate_codes", "prepare_emb")),
    Stage("finetune_reranker_llama", "RERANKER_DIR", ("prepare_reranker_dataset", "convert_voken_to_seed", "prepare_emb")),
    Stage("test_reranker_llama", "RERANKER_TEST_DIR", ("finetune_reranker_llama", "prepare_reranker_dataset")),
    Stage("report", entry="avg.experiments.report"),
)

#: the T5 retriever's stage for each training stage of eqs. 7 and 10 (one trainer, two stages)
T5_STAGES = {1: "train_retriever_t5", 2: "train_retriever_t5_stage2"}

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
    """The stage name the module of ``name`` writes into its stage.json: the stage's own name."""
    if stage(name).kind != "stage":
        raise KeyError(f"stage {name!r} writes no manifest")
    return name


def shell_lines(root: str) -> list[str]:
    """``VAR=<root>/<folder>`` for every stage with a folder (quoted for the shell)."""
    return [f"{s.var}={shlex.quote(str(Path(root) / s.out) if root else s.out)}" for s in STAGES if s.var]


def show() -> list[str]:
    """One line per stage: name, kind, shell variable, inputs."""
    rows = [("stage (= script, module, folder, manifest)", "kind", "variable", "inputs")]
    rows += [(s.name, s.kind, s.var or "-", " ".join(s.inputs) or "-") for s in STAGES]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m avg.artifacts.registry names | show | out <stage> | shell <stage root>"
    if not argv or argv[0] not in ("names", "show", "out", "shell") or (len(argv) != (1 if argv[0] in ("names", "show") else 2)):
        print(usage, file=sys.stderr)
        return 2
    try:
        if argv[0] == "names":
            print("\n".join(names()))
        elif argv[0] == "show":
            print("\n".join(show()))
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


__all__ = ["STAGES", "Stage", "T5_STAGES", "manifest_name", "names", "out", "out_dir", "shell_lines", "show", "stage"]
