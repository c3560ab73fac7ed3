#!/usr/bin/env bash
# The whole demo on a laptop CPU: set up .venv, then scripts/run_all.sh on configs/demo.sh (builds the
# synthetic demo assets, T5 and LLaMA, each cached; runs every stage, skipping those already complete and
# up to date) and print the results table. Safe to re-run; options go to run_all.sh (--force, --stages, ...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
export DATASET=demo
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
source scripts/common.sh
T0=$(date +%s)
# run_all.sh ends with the report stage (python -m avg.experiments.report); per-stage seconds in run_times.tsv
bash scripts/run_all.sh "$@"
case " $* " in *" --dry-run "*) exit 0 ;; esac
# demo_times.tsv: the name docs/results.md cites, the same table as run_times.tsv
cp "$STAGE_ROOT/run_times.tsv" "$STAGE_ROOT/.demo_times.tsv.tmp" && mv "$STAGE_ROOT/.demo_times.tsv.tmp" "$STAGE_ROOT/demo_times.tsv"
echo
echo "=== [demo] $(( $(date +%s) - T0 ))s in all (per stage: $STAGE_ROOT/run_times.tsv); results ($STAGE_ROOT/results.md):"
echo
if [ -f "$STAGE_ROOT/results.md" ]; then cat "$STAGE_ROOT/results.md"; else echo "(no results.md: the report stage did not run or found no metrics)"; fi
