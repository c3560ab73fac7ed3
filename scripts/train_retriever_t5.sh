#!/usr/bin/env bash
# Stage 1: generative training of the T5 retriever (eq. 7), val R@K per epoch, test R@K of the best
# checkpoint -> ${OUT_DIR}/${DATASET}/train_retriever_t5/  (multi-GPU: LAUNCH="accelerate launch")
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
$LAUNCH -m avg.stages.train_retriever_t5 --stage 1 \
  --data-dir "$RETRIEVER_DATA_DIR" --codes-dir "$CODES_DIR" --model "$RETRIEVER_MODEL" \
  --out-dir "$RETRIEVER_T5_DIR" --epochs "$T5_EPOCHS" --batch-size "$T5_BATCH_SIZE" --lr "$T5_LR" \
  --score "${T5_SCORE:-children}" --voken-tokens "${VOKEN_TOKENS:-per-level}" --query-prefix "${T5_QUERY_PREFIX:-0}" \
  --num-beams "$BEAM" --seed "$SEED" --run-name "${DATASET}-t5-stage1" ${T5_ARGS:-} "$@"
