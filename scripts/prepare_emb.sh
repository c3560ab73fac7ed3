#!/usr/bin/env bash
# Stage: encode every image and caption with a frozen CLIP -> ${OUT_DIR}/${DATASET}/prepare_emb/
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_path ANNOTATIONS IMAGE_ROOT
PRETRAINED_ARGS=()
[ -n "${CLIP_PRETRAINED:-}" ] && PRETRAINED_ARGS=(--pretrained "$CLIP_PRETRAINED")
python -m avg.stages.prepare_emb \
  --annotations "$ANNOTATIONS" --image-root "$IMAGE_ROOT" --out-dir "$EMB_DIR" \
  --backend "$CLIP_BACKEND" --clip-model "$CLIP_MODEL" "${PRETRAINED_ARGS[@]}" \
  --batch-size "$EMB_BATCH_SIZE" --image-grid "${EMB_IMAGE_GRID:-0}" --seed "$SEED" ${EMB_ARGS:-} "$@"
