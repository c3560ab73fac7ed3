#!/usr/bin/env bash
# Stage: rerank the retriever's top-k of a split with the trained reranker; R@1/5/10 before and after
# -> ${OUT_DIR}/${DATASET}/test_reranker_llama/ (another SPLIT: test_reranker_llama_<split>/). Multi-GPU: LAUNCH="torchrun --nproc_per_node 4" shards the lists.
# Extra flags go to avg.stages.test_reranker_llama, e.g. --max-queries 1000 (a seeded subset), --base-model PATH.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SPLIT=${SPLIT:-test}
OUT=$(split_out "$RERANKER_TEST_DIR")
$LAUNCH -m avg.stages.test_reranker_llama \
  --reranker-dir "$RERANKER_DIR/best" --data-dir "$RERANKER_DATA_DIR" --split "$SPLIT" \
  --out-dir "$OUT" --retriever-name "$RERANK_RETRIEVER" --seed "$SEED" ${RERANK_TEST_ARGS:-} "$@"
