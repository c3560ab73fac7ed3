#!/usr/bin/env bash
# Efficiency benchmark (paper Fig. 4): queries/s vs gallery size, generative retriever (alone and + embedding rerank) vs CLIP
# two-tower, exact and through approximate indexes (FAISS IVF-Flat, IVF-PQ, HNSW), same device, one run, with a
# recall-throughput curve per system (beam, reranked depth, nprobe, efSearch) ->
# ${OUT_DIR}/${DATASET}/efficiency/{efficiency.csv,efficiency.json,efficiency.png,curves.png,scale.csv}
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# the stage-2 retriever when it exists, else stage 1; override with RETRIEVER_DIR=...
if [ -z "${RETRIEVER_DIR:-}" ]; then
  RETRIEVER_DIR="$RETRIEVER_T5_STAGE2_DIR/best"
  [ -d "$RETRIEVER_DIR" ] || RETRIEVER_DIR="$RETRIEVER_T5_DIR/best"
fi
GALLERY_SIZES=${GALLERY_SIZES:-1000,10000,100000,300000,1000000}
BENCH_QUERIES=${BENCH_QUERIES:-64}
BENCH_BATCH_SIZE=${BENCH_BATCH_SIZE:-32}
BENCH_MAX_SECONDS=${BENCH_MAX_SECONDS:-20}
BENCH_DEVICE=${BENCH_DEVICE:-auto}
BENCH_ANN=${BENCH_ANN-ivf_flat,ivf_pq,hnsw}   # '' for none (they need faiss-cpu, in the dev and ann extras)
# the whole pipeline too: AVG + embedding rerank of RERANK_TOPK candidates, with the weight rerank_embed chose on val
# ('inf': the retriever's order); without that stage's fusion.json the pipeline row is left out, saying so
# and AVG + the trained LM reranker on the same top RERANK_TOPK (BENCH_LM_RERANKER, default $RERANKER_DIR/best
# when it exists; '' for none), timed at the gallery sizes of real images (synthetic ones have no reranker inputs)
FUSION="$RERANK_EMBED_DIR/fusion.json"
RERANK_K=${RERANK_TOPK:-0}
RERANK_W=0
if [ "$RERANK_K" -gt 0 ]; then
  if [ -f "$FUSION" ]; then
    RERANK_W=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['chosen_weight'])" "$FUSION")
  else
    echo "[benchmark_efficiency] no $FUSION (run scripts/rerank_embed.sh): timing without the avg+embed_rerank and avg+lm_rerank rows" >&2
    RERANK_K=0
  fi
fi
BENCH_LM_RERANKER=${BENCH_LM_RERANKER-$RERANKER_DIR/best}
LM_ARGS=()
if [ "$RERANK_K" -gt 0 ] && [ -n "$BENCH_LM_RERANKER" ]; then
  if [ -f "$BENCH_LM_RERANKER/reranker.json" ]; then
    LM_ARGS=(--lm-reranker-dir "$BENCH_LM_RERANKER")
  else
    echo "[benchmark_efficiency] no trained reranker in $BENCH_LM_RERANKER: timing without the avg+lm_rerank row" >&2
  fi
fi
python -m avg.experiments.efficiency "${LM_ARGS[@]}" --rerank-topk "$RERANK_K" --rerank-weight "$RERANK_W" --retriever-dir "$RETRIEVER_DIR" --emb-dir "$EMB_DIR" \
  --codes-dir "$CODES_DIR" --out-dir "$STAGE_ROOT/efficiency" --gallery-sizes "$GALLERY_SIZES" \
  --num-beams "$BEAM" --num-queries "$BENCH_QUERIES" --batch-size "$BENCH_BATCH_SIZE" \
  --max-seconds "$BENCH_MAX_SECONDS" --device "$BENCH_DEVICE" --ann "$BENCH_ANN" --seed "$SEED" "$@"
