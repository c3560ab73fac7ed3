#!/usr/bin/env bash
# Stage: voken codes for every image of every split -> ${OUT_DIR}/${DATASET}/generate_codes/
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
python -m avg.stages.generate_codes \
  --rqvae-dir "$RQVAE_DIR" --emb-dir "$EMB_DIR" --out-dir "$CODES_DIR" \
  --disambiguation "${CODE_DISAMBIGUATION:-none}" "$@"
