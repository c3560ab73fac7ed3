#!/usr/bin/env bash
# Stage: {train,val,test}.jsonl of {query, image_id, code, text_row} + per-split galleries -> ${OUT_DIR}/${DATASET}/prepare_retriever_dataset/
# Pseudo queries: PSEUDO_QUERIES="path1.jsonl path2.jsonl" (transductive when they cover val/test images).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_path ANNOTATIONS
PQ_ARGS=()
[ -n "${PSEUDO_QUERIES:-}" ] && PQ_ARGS=(--pseudo-queries ${PSEUDO_QUERIES})
MAXQ_ARGS=()
[ -n "${MAX_TRAIN_QUERIES:-}" ] && MAXQ_ARGS=(--max-train-queries "$MAX_TRAIN_QUERIES")
python -m avg.stages.prepare_retriever_dataset \
  --annotations "$ANNOTATIONS" --image-root "$IMAGE_ROOT" --codes-dir "$CODES_DIR" \
  --emb-dir "$EMB_DIR" --out-dir "$RETRIEVER_DATA_DIR" --seed "$SEED" "${PQ_ARGS[@]}" "${MAXQ_ARGS[@]}" "$@"
