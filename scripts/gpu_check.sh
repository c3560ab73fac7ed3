#!/usr/bin/env bash
# The first command on a GPU machine: every trainer a few steps in bf16 (tiny and real-sized shapes), the search on
# CUDA against the CPU, a 7B-shaped LLaMA LoRA step and a reranker step with peak memory, the efficiency benchmark
# at 1K/100K/1M images. One JSON object on stdout (the log on stderr); docs/gpu.md reads it.
#   bash scripts/gpu_check.sh > gpu_check.json            # on a GPU, under 8 minutes
#   bash scripts/gpu_check.sh --dry-run                   # the same checks on the CPU at tiny sizes
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  # shellcheck source=/dev/null
  source .venv/bin/activate
fi
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
exec python tools/gpu_check.py "$@"
