#!/usr/bin/env bash
# The whole demo on a laptop CPU: set up .venv, build the synthetic demo assets (cached), run every
# stage that exists on configs/demo.sh, and print the results table. Safe to re-run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
export DATASET=demo
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
source scripts/common.sh
mkdir -p "$STAGE_ROOT"
TIMES="$STAGE_ROOT/demo_times.tsv"
: > "$TIMES"
T0=$(date +%s)
stage() {
  local name=$1; shift
  echo
  echo "=== [demo] $name"
  local s; s=$(date +%s)
  "$@"
  local dt=$(( $(date +%s) - s ))
  printf '%s\t%s\n' "$name" "$dt" >> "$TIMES"
  echo "=== [demo] $name done in ${dt}s"
}

stage "demo assets (dataset + demo CLIP, cached)" python tools/make_demo_assets.py --data-dir "$DATA_DIR" --seed "$SEED"
stage "prepare_emb" bash scripts/prepare_emb.sh
stage "CLIP baseline" bash scripts/eval_clip_baseline.sh
stage "train_rqvae" bash scripts/train_rqvae.sh
stage "generate_codes" bash scripts/generate_codes.sh
stage "prepare_retriever_dataset" bash scripts/prepare_retriever_dataset.sh
stage "demo T5 (cached)" python tools/make_demo_t5.py --annotations "$ANNOTATIONS" --out-dir "$RETRIEVER_MODEL"
stage "train_retriever_t5 (stage 1)" bash scripts/train_retriever_t5.sh
stage "train_retriever_t5_stage2" bash scripts/train_retriever_t5_stage2.sh

echo
echo "=== [demo] results ($(( $(date +%s) - T0 ))s in all; per stage in $TIMES)"
python -m avg.eval.report "$STAGE_ROOT"
