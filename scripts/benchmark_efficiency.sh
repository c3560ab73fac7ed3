#!/usr/bin/env bash
# Efficiency benchmark (paper Fig. 4): queries/s vs gallery size, generative retriever vs CLIP two-tower,
# same device, one run -> ${OUT_DIR}/${DATASET}/efficiency/{efficiency.csv,efficiency.json,efficiency.png}
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# the stage-2 retriever when it exists, else stage 1; override with RETRIEVER_DIR=...
if [ -z "${RETRIEVER_DIR:-}" ]; then
  RETRIEVER_DIR="$STAGE_ROOT/retriever_t5_stage2/best"
  [ -d "$RETRIEVER_DIR" ] || RETRIEVER_DIR="$STAGE_ROOT/retriever_t5/best"
fi
GALLERY_SIZES=${GALLERY_SIZES:-1000,10000,100000,300000,1000000}
BENCH_QUERIES=${BENCH_QUERIES:-64}
BENCH_BATCH_SIZE=${BENCH_BATCH_SIZE:-32}
BENCH_MAX_SECONDS=${BENCH_MAX_SECONDS:-20}
BENCH_DEVICE=${BENCH_DEVICE:-auto}
python -m avg.eval.efficiency --retriever-dir "$RETRIEVER_DIR" --emb-dir "$STAGE_ROOT/emb" \
  --codes-dir "$STAGE_ROOT/codes" --out-dir "$STAGE_ROOT/efficiency" --gallery-sizes "$GALLERY_SIZES" \
  --num-beams "$BEAM" --num-queries "$BENCH_QUERIES" --batch-size "$BENCH_BATCH_SIZE" \
  --max-seconds "$BENCH_MAX_SECONDS" --device "$BENCH_DEVICE" --seed "$SEED" "$@"
