#!/usr/bin/env bash
# Baseline: exact text->image search with the same CLIP features -> ${OUT_DIR}/${DATASET}/eval_clip_baseline/ (SPLIT=val: eval_clip_baseline_val/)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SPLIT=${SPLIT:-test}
# one output dir per split (the split is part of the stage's configuration): eval_clip_baseline/ for test, eval_clip_baseline_<split>/ otherwise
OUT=$(split_out "$CLIP_BASELINE_DIR")
python -m avg.stages.eval_clip_baseline --emb-dir "$EMB_DIR" --split "$SPLIT" --out-dir "$OUT" "$@"
