#!/usr/bin/env bash
# One study of the paper's experiment grid (beam, codebook_size, code_len, ablation, backbone) on a config's
# main run -> ${OUT_DIR}/${DATASET}/grid/<study>/results.{md,csv}. Extra flags go to avg.experiments.grid (--help),
# e.g. --variants 512,1024, --dry-run, --force, --no-reduced.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ $# -lt 1 ]; then
  echo "usage: [DATASET=name] bash scripts/run_grid.sh <beam|codebook_size|code_len|ablation|backbone> [options]" >&2
  exit 2
fi
python -m avg.experiments.grid "$@" --dataset "$DATASET"
