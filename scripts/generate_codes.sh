#!/usr/bin/env bash
# Stage: voken codes for every image of every split -> ${OUT_DIR}/${DATASET}/codes/
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
python -m avg.rqvae.generate_codes \
  --rqvae-dir "$STAGE_ROOT/rqvae" --emb-dir "$STAGE_ROOT/emb" --out-dir "$STAGE_ROOT/codes" \
  --disambiguation "${CODE_DISAMBIGUATION:-none}" "$@"
