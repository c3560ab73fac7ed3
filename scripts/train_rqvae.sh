#!/usr/bin/env bash
# Stage: train the RQ-VAE image tokenizer with semantic alignment -> ${OUT_DIR}/${DATASET}/train_rqvae/
# Multi-GPU: LAUNCH="accelerate launch" (or "torchrun --nproc_per_node 4") bash scripts/train_rqvae.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
$LAUNCH -m avg.stages.train_rqvae \
  --emb-dir "$EMB_DIR" --out-dir "$RQVAE_DIR" \
  --num-levels "$CODE_LEN" --codebook-size "$CODEBOOK_SIZE" \
  --epochs "$RQ_EPOCHS" --batch-size "$RQ_BATCH_SIZE" --lr "$RQ_LR" --seed "$SEED" ${RQ_ARGS:-} "$@"
