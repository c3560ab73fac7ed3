#!/usr/bin/env bash
# Sets up .venv if missing (python3 is all it needs), then runs the test suite on CPU with tiny
# models and data. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k rqvae -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
bash scripts/install_browser.sh
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q --timeout 900 "$@"
