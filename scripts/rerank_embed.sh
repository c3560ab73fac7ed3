#!/usr/bin/env bash
# Stage: embedding rerank of the retriever's top-k (RERANK_RETRIEVER, RERANK_TOPK): CLIP cosine of query and
# candidate fused with the retriever's score, the weight chosen on val -> ${OUT_DIR}/${DATASET}/rerank_embed/
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
python -m avg.stages.rerank_embed \
  --retriever-dir "$STAGE_ROOT/$RERANK_RETRIEVER/best" --emb-dir "$EMB_DIR" --data-dir "$RETRIEVER_DATA_DIR" \
  --out-dir "$RERANK_EMBED_DIR" --topk "$RERANK_TOPK" --retriever-name "$RERANK_RETRIEVER" "$@"
