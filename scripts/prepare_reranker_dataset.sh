#!/usr/bin/env bash
# Stage: the retriever's top-k candidates (with scores) per training / val / test query -> ${OUT_DIR}/${DATASET}/prepare_reranker_dataset/
# Reuses the retriever's own eval run files when RERANK_REUSE_RUNS=1 (no search); searches the rest.
# Extra flags go to avg.stages.prepare_reranker_dataset, e.g. --run-file test=PATH, --max-test-queries 1000.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REUSE_ARGS=()
[ "${RERANK_REUSE_RUNS:-1}" = "1" ] && REUSE_ARGS=(--reuse-retriever-runs)
python -m avg.stages.prepare_reranker_dataset \
  --data-dir "$RETRIEVER_DATA_DIR" --retriever-dir "$STAGE_ROOT/$RERANK_RETRIEVER/best" \
  --out-dir "$RERANKER_DATA_DIR" --topk "$RERANK_TOPK" --num-beams "$BEAM" \
  --max-train-queries "$RERANK_MAX_TRAIN_QUERIES" --max-val-queries "$RERANK_MAX_VAL_QUERIES" \
  --train-gallery-size "$RERANK_TRAIN_GALLERY_SIZE" --train-candidates "${RERANK_TRAIN_CANDIDATES:-retriever}" \
  --emb-dir "$EMB_DIR" --seed "$SEED" "${REUSE_ARGS[@]}" "$@"
