"""The paper's experiment grid: one command per study, each ending in a results table.

    python -m avg.experiments.grid beam            # Table 7: beam size {1,5,10,20,30,40,50}, the trained T5 only
    python -m avg.experiments.grid codebook_size   # Table 4: N in {256,512,1024,2048}: RQ-VAE + codes + data + T5 stage 1
    python -m avg.experiments.grid code_len        # Table 5: M in {2,4,6,8,10}: same stages
    python -m avg.experiments.grid ablation        # Table 3: full, w/o alignment loss, w/o voken embedding, w/o stage 2
    python -m avg.experiments.grid backbone        # Table 6: the T5 and LLaMA backbones of GRID_BACKBONES

Every variant gets its own output root ``${OUT_DIR}/${DATASET}/grid/<study>/<variant>/`` and runs the
stage scripts there (through ``scripts/run_all.sh --stages ...`` with ``OUT_DIR`` pointing at it and
environment overrides), with symlinks to the outputs of the main run (``${OUT_DIR}/${DATASET}/``) that
it does not change: ``prepare_emb/`` for the tokenizer studies, ``train_rqvae/`` + ``generate_codes/`` for the retriever
ablations, the trained retriever for the beam study; so nothing is recomputed needlessly. A variant
is itself a stage (``stage.json`` in its root, :mod:`avg.core.stages`): a finished, up-to-date
variant is skipped, a killed one resumes through run_all's skipping of its finished stages.

Each variant's row is scored from its run file by :func:`avg.metrics.retrieval_metrics` and
written to ``<variant>/metrics_<system>_test.json`` with ``study``, ``variant``, ``num_beams``; the
study's table goes to ``grid/<study>/results.md`` and ``results.csv`` (plus the raw collision rate
for the tokenizer studies). ``--reduced`` (default from the config's ``GRID_REDUCED``; the demo sets
it) applies ``GRID_REDUCED_ENV`` and ``GRID_REDUCED_T5_ARGS``: on the demo, T5 stage 1 for one epoch
on a seeded 20,000 of the 50,000 training captions with val only after it, stage 2 for one epoch on a
seeded 2,000, the LLaMA on its demo schedule (configs/demo.sh), the RQ-VAE unchanged (30 epochs).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from avg.metrics import retrieval_metrics
from avg.artifacts.registry import T5_STAGES, out as stage_out, stage
from avg.artifacts.runfiles import read_run
from avg.core.io import InputError, atomic_open, read_json, write_json
from avg.core.stages import begin_stage
from avg.core.cli import run_main

ROOT = Path(__file__).resolve().parents[2]
STUDIES = ("beam", "codebook_size", "code_len", "ablation", "backbone")
DEFAULTS = {"beam": [1, 5, 10, 20, 30, 40, 50], "codebook_size": [256, 512, 1024, 2048], "code_len": [2, 4, 6, 8, 10],
            "ablation": ["full", "no_align", "no_voken_emb", "no_dis"]}
PREFIX = {"beam": "beam", "codebook_size": "N", "code_len": "M"}
DEFAULT_REDUCED_ENV = "T5_EPOCHS=1 MAX_TRAIN_QUERIES=20000 STAGE2_MAX_TRAIN_QUERIES=2000"
DEFAULT_REDUCED_T5_ARGS = "--eval-every 0 --eval-train-queries 0"
DEFAULT_BACKBONES = "t5-small=t5:t5-small t5-base=t5:t5-base t5-large=t5:t5-large llama=llama:$LLAMA_MODEL"
# output folders, from the stage registry
EMB, RQVAE, CODES = stage_out("prepare_emb"), stage_out("train_rqvae"), stage_out("generate_codes")
DATA, T5_1, T5_2 = stage_out("prepare_retriever_dataset"), stage_out("train_retriever_t5"), stage_out("train_retriever_t5_stage2")
T5_STAGE1 = f"{T5_1}/eval/run_test.jsonl"
T5_STAGE2 = f"{T5_2}/eval/run_test.jsonl"
LLAMA_TEST = f"{stage_out('test_retriever_llama')}/run_test.jsonl"


@dataclass
class Variant:
    """One row of a study: how to make its run file, and from what."""
    name: str
    system: str
    run_file: str                          # relative to the variant's stage root
    params: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)       # overrides for the stage scripts
    stages: list = field(default_factory=list)    # run_all stages to run in the variant's root
    links: list = field(default_factory=list)     # stage dirs linked from the main run
    link_from: Optional[str] = None        # link from this variant's stage root instead of the main run
    command: Optional[list] = None         # a direct command instead of run_all (beam study)
    tokenizer: bool = False                # the variant trains its own tokenizer


def load_config(dataset: str, env: Optional[dict] = None) -> dict:
    """The variables of configs/<dataset>.sh after environment overrides, as bash sees them."""
    env = dict(os.environ if env is None else env, DATASET=dataset)
    res = subprocess.run(["bash", "-c", "set -a; source scripts/common.sh >/dev/null; env -0"], cwd=ROOT, env=env,
                         capture_output=True)
    if res.returncode != 0:
        raise InputError(f"configs/{dataset}.sh: {res.stderr.decode(errors='replace').strip()}")
    out = {}
    for item in res.stdout.decode().split("\0"):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k] = v
    return out


def parse_env_list(text: str, where: str) -> dict:
    """'A=1 B="x y"' -> {"A": "1", "B": "x y"}."""
    out = {}
    for item in shlex.split(text):
        if "=" not in item:
            raise InputError(f"{where}: expected VAR=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def parse_backbones(text: str, cfg: dict) -> list[tuple[str, str, str]]:
    """GRID_BACKBONES 'name=kind:model ...' -> [(name, kind, model)]; kind is t5 or llama."""
    out = []
    for item in text.split():
        name, sep, rest = item.partition("=")
        kind, sep2, model = rest.partition(":")
        if not sep or not sep2 or kind not in ("t5", "llama") or not name or not model:
            raise InputError(f"GRID_BACKBONES: {item!r} is not name=t5:model or name=llama:model")
        out.append((name, kind, model.replace("$LLAMA_MODEL", cfg.get("LLAMA_MODEL", ""))))
    return out


def _join_args(*parts: str) -> str:
    return " ".join(p for p in parts if p and p.strip())


def numeric_values(study: str, wanted: Optional[str]) -> list[int]:
    """The values of a numeric study: the paper's, or any positive integers given to --variants."""
    if not wanted or study not in PREFIX:
        return DEFAULTS.get(study, [])
    out = []
    for w in (x.strip() for x in wanted.split(",") if x.strip()):
        digits = w[len(PREFIX[study]):] if w.startswith(PREFIX[study]) else w
        if not digits.isdigit() or int(digits) < 1:
            raise InputError(f"--variants: {w!r} is not a positive integer (or {PREFIX[study]}<integer>) for the {study} study")
        out.append(int(digits))
    return out


def build_variants(study: str, cfg: dict, *, reduced: bool, beam_model: str = "stage2",
                   values: Optional[Sequence[int]] = None) -> list[Variant]:
    """Every variant of a study, in table order (``values``: the beam sizes, N or M to use)."""
    values = list(values) if values else DEFAULTS.get(study, [])
    t5_args = _join_args(cfg.get("T5_ARGS", ""), cfg.get("GRID_REDUCED_T5_ARGS", DEFAULT_REDUCED_T5_ARGS) if reduced else "")
    base = parse_env_list(cfg.get("GRID_REDUCED_ENV", DEFAULT_REDUCED_ENV), "GRID_REDUCED_ENV") if reduced else {}
    if t5_args:
        base["T5_ARGS"] = t5_args
    t5_stages = ["prepare_retriever_dataset", "demo_t5", "train_retriever_t5"]
    tok_stages = ["train_rqvae", "generate_codes"]
    if study == "beam":
        t5_stage = 2 if beam_model == "stage2" else 1
        model_dir = stage_out(T5_STAGES[t5_stage])
        out = []
        for b in values:
            out.append(Variant(f"beam{b}", f"avg_t5_stage{t5_stage}", f"{model_dir}_eval/eval/run_test.jsonl",
                               params={"num_beams": b}, links=[DATA, model_dir],
                               command=["python", "-m", stage(T5_STAGES[t5_stage]).module, "--epochs", "0",
                                        "--init-from", f"{model_dir}/best", "--data-dir", DATA,
                                        "--out-dir", f"{model_dir}_eval", "--num-beams", str(b),
                                        "--seed", cfg.get("SEED", "42"), "--run-name",
                                        f"{cfg.get('DATASET', '')}-grid-beam{b}", *shlex.split(cfg.get("T5_ARGS", ""))]))
        return out
    if study in ("codebook_size", "code_len"):
        var = "CODEBOOK_SIZE" if study == "codebook_size" else "CODE_LEN"
        return [Variant(f"{PREFIX[study]}{v}", "avg_t5_stage1", T5_STAGE1, params={study: v}, env={**base, var: str(v)},
                        stages=tok_stages + t5_stages, links=[EMB], tokenizer=True) for v in values]
    if study == "ablation":
        both = t5_stages + ["train_retriever_t5_stage2"]
        no_vok = dict(base, T5_ARGS=_join_args(base.get("T5_ARGS", ""), "--no-voken-embedding"))
        return [
            Variant("full", "avg_t5_stage2", T5_STAGE2, env=dict(base), stages=both, links=[EMB, RQVAE, CODES]),
            Variant("no_align", "avg_t5_stage2", T5_STAGE2,
                    env=dict(base, RQ_ARGS=_join_args(cfg.get("RQ_ARGS", ""), "--align-weight 0")),
                    stages=tok_stages + both, links=[EMB], tokenizer=True),
            Variant("no_voken_emb", "avg_t5_stage2", T5_STAGE2, env=no_vok, stages=both, links=[EMB, RQVAE, CODES]),
            # w/o the discriminative stage = the full variant's stage-1 model (nothing to train)
            Variant("no_dis", "avg_t5_stage1", T5_STAGE1, links=[T5_1], link_from="full"),
        ]
    if study == "backbone":
        out = []
        for name, kind, model in parse_backbones(cfg.get("GRID_BACKBONES") or DEFAULT_BACKBONES, cfg):
            if kind == "t5":
                out.append(Variant(name, "avg_t5_stage1", T5_STAGE1, params={"backbone": model},
                                   env=dict(base, RETRIEVER_MODEL=model), stages=t5_stages, links=[EMB, RQVAE, CODES]))
            else:
                out.append(Variant(name, "avg_llama", LLAMA_TEST, params={"backbone": model}, env=dict(base, LLAMA_MODEL=model),
                                   stages=["prepare_retriever_dataset", "demo_llama", "finetune_retriever_llama",
                                           "test_retriever_llama"], links=[EMB, RQVAE, CODES]))
        return out
    raise InputError(f"unknown study {study!r} (studies: {', '.join(STUDIES)})")


def select_variants(study: str, variants: list[Variant], wanted: Optional[str]) -> list[Variant]:
    """A subset of named variants; dependencies (no_dis needs full) are added first."""
    if not wanted:
        return variants
    by_name = {v.name: v for v in variants}
    picked = []
    for w in (x.strip() for x in wanted.split(",") if x.strip()):
        if w not in by_name:
            raise InputError(f"--variants: {w!r} is not a variant of {study} ({', '.join(by_name)})"
                             + ("; other backbones: set GRID_BACKBONES" if study == "backbone" else ""))
        picked.append(by_name[w])
    for v in list(picked):
        if v.link_from and by_name[v.link_from] not in picked:
            picked.insert(0, by_name[v.link_from])
    return [v for v in variants if v in picked]


def ensure_link(link: Path, target: Path, force: bool) -> None:
    """A relative symlink link -> target (replacing a stale link; a real folder only with force)."""
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if os.readlink(link) == rel:
            return
        link.unlink()
    elif link.exists():
        if not force:
            raise InputError(f"{link}: a real folder where the grid links {target}; remove it or pass --force")
        import shutil
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(rel, link)


def gallery_size_for(run_file: Path) -> Optional[int]:
    """Gallery size from the stage's own metrics json next to the run file (for the mean rank)."""
    for cand in sorted(run_file.parent.glob("metrics*test*.json")):
        try:
            m = read_json(cand)
        except Exception:  # noqa: BLE001 - any unreadable file: fall back to no gallery size
            continue
        if isinstance(m, dict) and m.get("gallery_size"):
            return int(m["gallery_size"])
    return None


def score_variant(study: str, v: Variant, stage_root: Path, cfg: dict, seconds: float) -> dict:
    """The variant's row: metrics from its run file + what identifies it."""
    run_file = stage_root / v.run_file
    records = read_run(run_file)
    metrics = retrieval_metrics(records, gallery_size=gallery_size_for(run_file))
    row = {"system": v.system, "split": "test", "study": study, "variant": v.name,
           "num_beams": int(v.params.get("num_beams", v.env.get("BEAM", cfg.get("BEAM", 0)) or 0)),
           **{k: val for k, val in v.params.items() if k != "num_beams"}, **metrics,
           "run_file": os.path.relpath(run_file, stage_root.parent), "seconds": round(seconds, 1)}
    stats_path = stage_root / CODES / "stats.json"  # its own codes or the main run's (linked)
    if stats_path.is_file():
        stats = read_json(stats_path)
        row["raw_collision_rate"] = stats.get("raw_collision_rate")
        row["largest_group"] = stats.get("largest_group")
    return row


def run_variant(study: str, v: Variant, grid_dir: Path, main_root: Path, cfg: dict, *, force: bool,
                dry_run: bool = False) -> Optional[dict]:
    """Run one variant unless it is up to date; returns its row (None on a dry run)."""
    dataset = cfg["DATASET"]
    vroot = grid_dir / v.name
    stage_root = vroot / dataset
    src_root = grid_dir / v.link_from / dataset if v.link_from else main_root
    for name in v.links:
        if not (src_root / name).exists() and not (dry_run and v.link_from):
            hint = f"run variant {v.link_from} first" if v.link_from else f"run scripts/run_all.sh for DATASET={dataset} first"
            raise InputError(f"{src_root / name}: not found; the {study} grid's variant {v.name} needs it ({hint})")
    config = {"study": study, "variant": v.name, "dataset": dataset, "system": v.system, "run_file": v.run_file,
              "env": v.env, "stages": v.stages, "links": v.links, "link_from": v.link_from, "command": v.command}
    inputs = [src_root / name for name in v.links]
    if dry_run:
        state = "not run"
        try:
            run = begin_stage(vroot, f"grid_{study}", config, inputs=inputs, force=force, mark_running=False)
            prev = (run.previous or {}).get("status")
            state = ("up to date (skipped)" if run.up_to_date else "complete but stale: re-runs" if prev == "complete"
                     else "interrupted: resumes" if prev else "will run")
        except InputError as e:
            state = f"refused: {e}"
        if v.command:
            what = f"(cd {stage_root} && {' '.join(v.command)})"
        else:
            what = f"run_all.sh --stages {','.join(v.stages)}" if v.stages else f"(the {v.link_from} variant's outputs)"
        env = " ".join(f"{k}={shlex.quote(val)}" for k, val in v.env.items())
        print(f"  {v.name:<14} {state}\n      $ OUT_DIR={vroot} {env} {what}")
        return None
    run = begin_stage(vroot, f"grid_{study}", config, inputs=inputs, force=force, mark_running=False)
    metrics_path = vroot / f"metrics_{v.system}_test.json"
    if run.up_to_date and metrics_path.is_file():
        print(f"[grid] {study}/{v.name}: up to date, skipped ({metrics_path})", flush=True)
        # re-scored from the run file (cheap), so the table always follows this code's protocol
        row = score_variant(study, v, stage_root, cfg, float(read_json(metrics_path).get("seconds", 0.0)))
        write_json(row, metrics_path)
        return row
    run.running()
    for name in v.links:
        ensure_link(stage_root / name, src_root / name, force)
    t0 = time.time()
    env = dict(os.environ, DATASET=dataset, OUT_DIR=str(vroot), **v.env)
    for k, default in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(k, default)  # as scripts/common.sh, for the direct command of the beam study
    if v.command or v.stages:
        if v.command:
            cmd = [sys.executable, *v.command[1:]] + (["--force"] if force else [])
            env["AVG_SKIP_DONE"] = "0" if force else "1"
            cwd = stage_root
        else:
            cmd = ["bash", str(ROOT / "scripts" / "run_all.sh"), "--stages", ",".join(v.stages)] + (["--force"] if force else [])
            cwd = ROOT
        print(f"[grid] {study}/{v.name}: {' '.join(f'{k}={shlex.quote(x)}' for k, x in v.env.items())} "
              f"{' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        res = subprocess.run(cmd, cwd=cwd, env=env)
        if res.returncode != 0:
            raise SystemExit(f"[grid] {study}/{v.name} failed (exit {res.returncode}); re-run the same command to resume")
    row = score_variant(study, v, stage_root, cfg, time.time() - t0)
    write_json(row, metrics_path)
    run.complete(summary={k: row[k] for k in ("R@1", "R@5", "R@10", "mean_rank", "num_queries")})
    print(f"[grid] {study}/{v.name}: R@1={row['R@1']:.2f} R@5={row['R@5']:.2f} R@10={row['R@10']:.2f} "
          f"({row['num_queries']} queries, {row['seconds']:.0f}s)", flush=True)
    return row


TABLE_COLUMNS = ["variant", "system", "num_beams", "codebook_size", "code_len", "backbone", "R@1", "R@5", "R@10",
                 "mean_rank", "num_queries", "raw_collision_rate", "largest_group", "seconds"]


def results_table(rows: Sequence[dict]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    cols = [c for c in TABLE_COLUMNS if c in df.columns and df[c].notna().any()]
    return df[cols]


def to_markdown(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            x = r[c]
            if x is None or (isinstance(x, float) and x != x):
                cells.append("")
            elif c == "raw_collision_rate":
                cells.append(f"{100 * x:.1f} %")
            elif c in ("num_queries", "num_beams", "codebook_size", "code_len", "largest_group"):
                cells.append(str(int(x)))
            elif isinstance(x, float):
                cells.append(f"{x:.2f}" if c != "seconds" else f"{x:.0f}")
            else:
                cells.append(str(x))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=STUDIES, help="which study to run")
    p.add_argument("--dataset", default=os.environ.get("DATASET", "demo"), help="config name (configs/<name>.sh)")
    p.add_argument("--variants", default=None,
                   help="comma-separated variants: for beam/codebook_size/code_len any values (e.g. '5,20' or "
                        "'beam5,beam20'; default: the paper's), for ablation/backbone a subset of names "
                        "(e.g. 'full,no_dis'); default: every variant")
    p.add_argument("--reduced", action=argparse.BooleanOptionalAction, default=None,
                   help="reduced schedules (GRID_REDUCED_ENV, GRID_REDUCED_T5_ARGS; on the demo: T5 1 epoch on a seeded "
                        "20,000 captions, stage 2 on 2,000); default: the config's GRID_REDUCED")
    p.add_argument("--beam-model", choices=("stage1", "stage2"), default="stage2",
                   help="beam study: evaluate the main run's stage-1 or stage-2 T5 (paper Table 7: the full model)")
    p.add_argument("--force", action="store_true", help="re-run every variant and its stages (overwrite other configurations)")
    p.add_argument("--dry-run", action="store_true", help="print each variant's command and state; run nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.dataset)
    reduced = args.reduced if args.reduced is not None else cfg.get("GRID_REDUCED", "0") not in ("", "0")
    main_root = (ROOT / cfg["OUT_DIR"] / cfg["DATASET"]).resolve()
    grid_dir = main_root / "grid" / args.study
    values = numeric_values(args.study, args.variants)
    variants = build_variants(args.study, cfg, reduced=reduced, beam_model=args.beam_model, values=values)
    if args.study not in PREFIX:
        variants = select_variants(args.study, variants, args.variants)
    schedule = "reduced" if reduced and args.study != "beam" else "config"
    print(f"[grid] {args.study} on {cfg['DATASET']} ({schedule} schedules): {', '.join(v.name for v in variants)} "
          f"-> {grid_dir}", flush=True)
    rows = []
    t0 = time.time()
    for v in variants:
        row = run_variant(args.study, v, grid_dir, main_root, cfg, force=args.force, dry_run=args.dry_run)
        if row is not None:
            rows.append(row)
    if args.dry_run:
        return 0
    df = results_table(rows)
    md = to_markdown(df)
    model = f", model: the main run's {T5_2 if args.beam_model == 'stage2' else T5_1}" \
        if args.study == "beam" else ""
    head = (f"{args.study} study on {cfg['DATASET']}, test split{model}, {schedule} schedules"
            + (f" ({_join_args(cfg.get('GRID_REDUCED_ENV', DEFAULT_REDUCED_ENV), cfg.get('GRID_REDUCED_T5_ARGS', DEFAULT_REDUCED_T5_ARGS))})"
               if schedule == "reduced" else ""))
    with atomic_open(grid_dir / "results.csv") as f:
        df.to_csv(f, index=False)
    with atomic_open(grid_dir / "results.md") as f:
        f.write(f"{head}\n\n{md}\n")
    print(f"\n{head}\n\n{md}\n\n[grid] {len(rows)} variants in {time.time() - t0:.0f}s; "
          f"table: {grid_dir / 'results.md'}, {grid_dir / 'results.csv'}")
    return 0


if __name__ == "__main__":
    run_main(main)
