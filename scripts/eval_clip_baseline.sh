#!/usr/bin/env bash
# Baseline: exact text->image search with the same CLIP features -> ${OUT_DIR}/${DATASET}/clip_baseline/
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
python -m avg.eval.clip_baseline --emb-dir "$STAGE_ROOT/emb" --split "${SPLIT:-test}" --out-dir "$STAGE_ROOT/clip_baseline" "$@"
