#!/usr/bin/env bash
# Sets up .venv if missing (python3 is all it needs), then runs the test suite on CPU with tiny
# models and data. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k rqvae -x` (`-n 0`: one process).
# The tests run in AVG_TEST_WORKERS processes (pytest-xdist; default: the cores, at most 4), one thread each,
# a test file on one worker (its module fixtures are built once).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
bash scripts/install_browser.sh
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cores=$(nproc 2>/dev/null || echo 1)
workers=${AVG_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
if [ "$workers" -gt 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}; fi
exec .venv/bin/python -m pytest -q --timeout 900 -n "$workers" --dist loadfile "$@"
