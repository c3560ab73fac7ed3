#!/usr/bin/env bash
# Stage 2: discriminative fine-tuning from the stage-1 best checkpoint, L = L_gen + lambda * L_dis
# (eqs. 8-10) -> ${OUT_DIR}/${DATASET}/train_retriever_t5_stage2/
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
$LAUNCH -m avg.stages.train_retriever_t5_stage2 \
  --data-dir "$RETRIEVER_DATA_DIR" --init-from "$RETRIEVER_T5_DIR/best" \
  --out-dir "$RETRIEVER_T5_STAGE2_DIR" --epochs "$STAGE2_EPOCHS" --batch-size "$T5_BATCH_SIZE" \
  --lr "$STAGE2_LR" --max-train-queries "${STAGE2_MAX_TRAIN_QUERIES:-0}" --dis-beams "$DIS_BEAMS" --dis-weight "$DIS_WEIGHT" --dis-temperature "$DIS_TEMPERATURE" \
  --score "${T5_SCORE:-children}" --dis-lists "${DIS_LISTS:-all}" \
  --num-beams "$BEAM" --seed "$SEED" --run-name "${DATASET}-t5-stage2" ${T5_ARGS:-} "$@"
