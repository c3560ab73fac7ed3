#!/usr/bin/env bash
# Stage: constrained beam search with the trained LLaMA retriever on a split -> ${OUT_DIR}/${DATASET}/test_retriever_llama/
# (another SPLIT: test_retriever_llama_<split>/)
# Multi-GPU: LAUNCH="torchrun --nproc_per_node 4" shards the queries. Extra flags go to avg.stages.test_retriever_llama,
# e.g. --max-queries 500 (a seeded subset), --fast-search, --base-model PATH; LLAMA_TEST_ARGS (config) adds flags too.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SPLIT=${SPLIT:-test}
OUT=$(split_out "$RETRIEVER_LLAMA_TEST_DIR")
$LAUNCH -m avg.stages.test_retriever_llama \
  --retriever-dir "$RETRIEVER_LLAMA_DIR/best" --data-dir "$RETRIEVER_DATA_DIR" --split "$SPLIT" \
  --out-dir "$OUT" --num-beams "$BEAM" --seed "$SEED" ${LLAMA_TEST_ARGS:-} "$@"
