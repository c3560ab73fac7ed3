#!/usr/bin/env bash
# Stage: every image's vokens as SEED-LLaMA image tokens <img_NNNNN> (+ RERANK_RICH_LEVELS residual k-means tokens
# of its CLIP feature) -> ${OUT_DIR}/${DATASET}/convert_voken_to_seed/. Extra flags go to avg.stages.convert_voken_to_seed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
python -m avg.stages.convert_voken_to_seed \
  --codes-dir "$CODES_DIR" --emb-dir "$EMB_DIR" --out-dir "$RERANKER_TOKENS_DIR" \
  --rich-levels "$RERANK_RICH_LEVELS" --rich-size "$RERANK_RICH_SIZE" --seed "$SEED" "$@"
