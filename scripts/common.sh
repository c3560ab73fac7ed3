# Sourced by every stage script: repo root, dataset config, virtualenv, headless defaults.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATASET=${DATASET:-demo}
CONFIG_FILE="configs/${DATASET}.sh"
if [ ! -f "$CONFIG_FILE" ]; then
  echo "error: no config file $CONFIG_FILE for DATASET=$DATASET (available: $(cd configs && ls -- *.sh | sed 's/\.sh$//' | tr '\n' ' '))" >&2
  exit 2
fi
# shellcheck source=/dev/null
source "$CONFIG_FILE"
# The method: a named recipe (configs/recipes/<name>.sh: paper | best) sets what the dataset config does not --
# the code score, voken tokens, query prefix, stage 2's lists and weight, the reranker. The dataset config names
# its default (RECIPE); the environment wins over both, variable by variable.
RECIPE=${RECIPE:-paper}
RECIPE_FILE="configs/recipes/${RECIPE}.sh"
if [ ! -f "$RECIPE_FILE" ]; then
  echo "error: no recipe file $RECIPE_FILE for RECIPE=$RECIPE (available: $(ls configs/recipes | sed 's/\.sh$//' | tr '\n' ' '))" >&2
  exit 2
fi
# shellcheck source=/dev/null
source "$RECIPE_FILE"
export AVG_RECIPE=$RECIPE  # recorded in every stage.json and wandb config
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  # shellcheck source=/dev/null
  source .venv/bin/activate
fi
# wandb: WANDB_MODE as set; unset, online when logged in (wandb login), offline otherwise (avg.core.tracking)
export WANDB_SILENT=${WANDB_SILENT:-true}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
# Output to a log (not a terminal): the package's bars print a line every AVG_PROGRESS_SECONDS
# (avg.core.progress); the Hugging Face libraries' own bars are switched off.
if [ ! -t 2 ]; then export HF_HUB_DISABLE_PROGRESS_BARS=${HF_HUB_DISABLE_PROGRESS_BARS:-1}; fi
STAGE_ROOT="${OUT_DIR}/${DATASET}"
# Each stage's output folder (EMB_DIR, CODES_DIR, RETRIEVER_T5_DIR, ...), from the stage registry
# (avg/artifacts/registry.py), the one place that names them.
STAGE_DIRS=$(python -m avg.artifacts.registry shell "$STAGE_ROOT") \
  || { echo "error: could not read the stage registry (avg/artifacts/registry.py)" >&2; exit 2; }
eval "$STAGE_DIRS"
# stage_out NAME: the output folder of stage NAME relative to a stage root (for runners that make other roots)
stage_out() { python -m avg.artifacts.registry out "$1"; }
# split_out DIR: the folder of a stage that evaluates one SPLIT: DIR for test, DIR_<split> for another split
split_out() { if [ "${SPLIT:-test}" = test ]; then echo "$1"; else echo "${1}_$SPLIT"; fi; }
# LAUNCH runs python modules; set LAUNCH="torchrun --nproc_per_node 4" or "accelerate launch" for multi-GPU.
LAUNCH=${LAUNCH:-python}
# require_path VAR...: stop (status 2) naming the variable and the config when a path it holds does not exist.
require_path() {
  local var
  for var in "$@"; do
    if [ ! -e "${!var}" ]; then
      echo "error: $var=${!var} does not exist (set in $CONFIG_FILE or in the environment)" >&2
      exit 2
    fi
  done
}
# Real-data configs set REQUIRE_GPU=1: stop at once, with the reason, when torch sees no CUDA device
# (a missing driver or a CPU-only torch would otherwise train for days on the CPU). ALLOW_CPU=1 runs
# there anyway. Checked once per command: child scripts inherit AVG_GPU_CHECKED.
if [ "${REQUIRE_GPU:-0}" = 1 ] && [ -z "${ALLOW_CPU:-}" ] && [ -z "${AVG_GPU_CHECKED:-}" ]; then
  if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null; then
    echo "error: $CONFIG_FILE expects a GPU, but torch sees no CUDA device ($(python -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda)' 2>/dev/null || echo 'torch not importable')); check the NVIDIA driver and the torch build (environment.yml), or set ALLOW_CPU=1 to run on the CPU" >&2
    exit 2
  fi
  export AVG_GPU_CHECKED=1
fi
