#!/usr/bin/env bash
# Every stage of a config, in order, skipping stages whose outputs are complete and up to date
# (their stage.json manifest: same configuration, unchanged inputs); a failing stage stops the run.
#   DATASET=flickr30k bash scripts/run_all.sh [--force] [--stages a,b | --skip a,b] [--dry-run]
# Per-stage times go to ${OUT_DIR}/${DATASET}/run_times.tsv. See --help.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The stages, in pipeline order, and their output folders come from the stage registry
# (avg/artifacts/registry.py). demo_* stages build the synthetic demo's assets (each tool keeps its
# own cache); they run only when DEMO_TOOLS=1, which configs/demo.sh sets.
REGISTRY_PY="$ROOT/.venv/bin/python"; [ -x "$REGISTRY_PY" ] || REGISTRY_PY=python3
registry() { (cd "$ROOT" && "$REGISTRY_PY" -m avg.artifacts.registry "$@"); }
mapfile -t ALL_STAGES < <(registry names)
[ "${#ALL_STAGES[@]}" -gt 0 ] || { echo "error: could not read the stage registry (avg/artifacts/registry.py)" >&2; exit 2; }

usage() {
  cat <<EOF
usage: [DATASET=name] [VAR=value ...] bash scripts/run_all.sh [options]

Runs every stage of configs/\${DATASET:-demo}.sh in order. With AVG_SKIP_DONE=1 (set here) a stage
whose outputs are complete and were made with the same configuration from unchanged inputs
returns at once, so a re-run after a crash resumes at the first stage that is not done.

options:
  --force          re-run every stage and pass --force to it (overwrite outputs of another configuration)
  --stages a,b     run only these stages (in pipeline order)
  --skip a,b       run every stage but these
  --dry-run        print the stages that would run and the state of their outputs; run nothing
  -h, --help       this help

stages, in order (demo_* only when DEMO_TOOLS=1, as in configs/demo.sh):
$(printf '  %s\n' "${ALL_STAGES[@]}")
EOF
}

FORCE=0; DRY_RUN=0; ONLY=""; SKIP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --stages) [ $# -ge 2 ] || { echo "error: --stages needs a comma-separated list" >&2; exit 2; }; ONLY=$2; shift ;;
    --stages=*) ONLY=${1#*=} ;;
    --skip) [ $# -ge 2 ] || { echo "error: --skip needs a comma-separated list" >&2; exit 2; }; SKIP=$2; shift ;;
    --skip=*) SKIP=${1#*=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

known() { local s; for s in "${ALL_STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
in_list() { [[ ",$2," == *",$1,"* ]]; }
for s in ${ONLY//,/ } ${SKIP//,/ }; do
  known "$s" || { echo "error: unknown stage '$s' (stages: ${ALL_STAGES[*]})" >&2; exit 2; }
done

source "$ROOT/scripts/common.sh"
DEMO_TOOLS=${DEMO_TOOLS:-0}
# every stage of this run in one wandb group (a seed study's runner sets one group for all its seeds)
export AVG_WANDB_GROUP=${AVG_WANDB_GROUP:-$DATASET-$RECIPE-$(date +%Y%m%d-%H%M%S)}
if [ "$FORCE" = 1 ]; then
  export AVG_SKIP_DONE=0
  FORCE_ARGS=(--force)
else
  export AVG_SKIP_DONE=1
  FORCE_ARGS=()
fi

# stage -> command (STAGE_CMD) and output folder whose stage.json says whether it is done (STAGE_OUT)
stage_def() {
  STAGE_OUT=""
  case "$1" in
    demo_assets) STAGE_CMD=(python tools/make_demo_assets.py --data-dir "$DATA_DIR" --seed "$SEED"); STAGE_OUT=cached ;;
    demo_t5) STAGE_CMD=(python tools/make_demo_t5.py --annotations "$ANNOTATIONS" --out-dir "$RETRIEVER_MODEL" ${DEMO_T5_ARGS:-}); STAGE_OUT=cached ;;
    demo_llama) STAGE_CMD=(python tools/make_demo_llama.py --annotations "$ANNOTATIONS" --out-dir "$LLAMA_MODEL" ${DEMO_LLAMA_ARGS:-}); STAGE_OUT=cached ;;
    report) STAGE_CMD=(python -m avg.experiments.report "$STAGE_ROOT"); STAGE_OUT=always ;;
    *) STAGE_CMD=(bash "scripts/$1.sh" "${FORCE_ARGS[@]}"); STAGE_OUT=$(registry out "$1") ;;
  esac
}

# "complete <run_id>" / "complete, inputs changed" / "interrupted" / "not run" / "outputs without manifest"
manifest_state() {
  python - "$1" <<'EOF'
import os, sys
from avg.core.stages import fingerprint, read_manifest
out = sys.argv[1]
try:
    m = read_manifest(out)
except Exception as e:  # a broken manifest: the stage itself will say so
    print(f"unreadable manifest ({e})"); sys.exit(0)
if m is None:
    print("will run (outputs without a manifest)" if os.path.isdir(out) and os.listdir(out) else "not run"); sys.exit(0)
if m.get("status") != "complete":
    print("interrupted (resumes)"); sys.exit(0)
stale = [p for p, fp in m.get("inputs", {}).items() if fingerprint(p) != fp]
print(f"complete {m.get('run_id')}" + (f", inputs changed: {', '.join(stale)}" if stale else ""))
EOF
}

selected=()
for s in "${ALL_STAGES[@]}"; do
  if [[ "$s" == demo_* ]] && [ "$DEMO_TOOLS" != 1 ]; then continue; fi
  if [ -n "$ONLY" ] && ! in_list "$s" "$ONLY"; then continue; fi
  if [ -n "$SKIP" ] && in_list "$s" "$SKIP"; then continue; fi
  selected+=("$s")
done

if [ "$DRY_RUN" = 1 ]; then
  echo "[run_all] DATASET=$DATASET, outputs under $STAGE_ROOT, AVG_SKIP_DONE=$AVG_SKIP_DONE (dry run: nothing is run)"
  for s in "${selected[@]}"; do
    stage_def "$s"
    if [[ "$s" != demo_* && "$s" != report && ! -f "scripts/$s.sh" ]]; then
      printf '  %-28s skipped: scripts/%s.sh does not exist yet\n' "$s" "$s"; continue
    fi
    case "$STAGE_OUT" in
      cached) state="cached tool (builds only what is missing)" ;;
      always) state="always runs (cheap)" ;;
      "") state="state unknown" ;;
      *) state=$(manifest_state "$STAGE_ROOT/$STAGE_OUT")
         if [ "$FORCE" = 1 ]; then state="forced ($state)"
         elif [[ "$state" == "complete "* && "$state" != *"inputs changed"* ]]; then
           state="up to date unless its configuration changed ($state)"
         fi ;;
    esac
    printf '  %-28s %s\n      $ %s\n' "$s" "$state" "${STAGE_CMD[*]}"
  done
  exit 0
fi

mkdir -p "$STAGE_ROOT"
TIMES="$STAGE_ROOT/run_times.tsv"
TIMES_TMP="$STAGE_ROOT/.run_times.tsv.tmp"
printf 'stage\tseconds\tstatus\n' > "$TIMES_TMP"
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$TIMES_TMP"; cp "$TIMES_TMP" "$TIMES.part" && mv "$TIMES.part" "$TIMES"; }
T0=$(date +%s)
echo "[run_all] DATASET=$DATASET, outputs under $STAGE_ROOT; stages: ${selected[*]}"
for s in "${selected[@]}"; do
  stage_def "$s"
  if [[ "$s" != demo_* && "$s" != report && ! -f "scripts/$s.sh" ]]; then
    echo "[run_all] NOTICE: skipping $s: scripts/$s.sh does not exist yet"
    record "$s" 0 "missing script"
    continue
  fi
  before=""
  if [ -n "$STAGE_OUT" ] && [ "$STAGE_OUT" != cached ] && [ "$STAGE_OUT" != always ]; then
    before=$(manifest_state "$STAGE_ROOT/$STAGE_OUT")
  fi
  echo
  echo "=== [run_all] $s"
  t=$(date +%s)
  if ! "${STAGE_CMD[@]}"; then
    dt=$(( $(date +%s) - t ))
    record "$s" "$dt" "failed"
    echo "[run_all] stage $s FAILED after ${dt}s (command: ${STAGE_CMD[*]}); stages after it were not run" >&2
    exit 1
  fi
  dt=$(( $(date +%s) - t ))
  status=ran
  [ "$STAGE_OUT" = cached ] && status="ran (cached tool)"
  if [[ "$before" == "complete "* ]] && [ "$(manifest_state "$STAGE_ROOT/$STAGE_OUT")" = "$before" ]; then
    status="up to date"  # the stage returned without producing a new run_id
  fi
  record "$s" "$dt" "$status"
  echo "=== [run_all] $s: $status in ${dt}s"
done
echo
echo "[run_all] done in $(( $(date +%s) - T0 ))s; per stage:"
column -t -s $'\t' "$TIMES" 2>/dev/null || cat "$TIMES"
