#!/usr/bin/env bash
# Rehearse the real run on the CPU: configs/flickr30k.sh and configs/coco.sh through scripts/run_all.sh (every
# stage, then the efficiency benchmark and the report) with the stand-ins of tools/make_rehearsal_fixture.py in
# place of the real data and weights (same types, layouts and code paths; tiny and random). Only model paths
# (through a local hub cache), sizes and schedules are overridden, and the GPU's bf16/fp16 paths are forced.
#   bash scripts/rehearse.sh                                 # both datasets x both recipes x 1 and 2 processes
#   bash scripts/rehearse.sh --runs flickr30k:paper:1,coco:best:2 --jobs 2   # chosen runs (dataset:recipe:processes),
#                                                                            # two at a time (logs in the work folder)
# Two-process runs force the GPU's bf16/fp16 paths; after a one-process run (float32), two processes evaluate
# its trained models again and must rank and score as one did. docs/real_data.md, "The rehearsal", says what it
# checks and what it cannot stand in for.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

RUNS=""; JOBS=1; WORK=${REHEARSAL_WORK:-outputs/rehearsal}; FIXTURE=${REHEARSAL_FIXTURE:-data/rehearsal}
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift ;;
    --jobs) JOBS=$2; shift ;;
    --work) WORK=$2; shift ;;
    --fixture) FIXTURE=$2; shift ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$RUNS" ]; then
  for d in flickr30k coco; do for r in paper best; do RUNS+="$d:$r:1,$d:$r:2,"; done; done
fi
if [ -z "${VIRTUAL_ENV:-}" ]; then
  bash scripts/bootstrap.sh >&2
  # shellcheck source=/dev/null
  source .venv/bin/activate
fi

python tools/make_rehearsal_fixture.py --out-dir "$FIXTURE"
case "$FIXTURE" in /*) ;; *) FIXTURE="$ROOT/$FIXTURE" ;; esac
# The real configs' hub names (openai/clip-vit-large-patch14-336, t5-base, meta-llama/Llama-2-7b-hf) resolve to
# the fixture's hub cache; nothing may reach the network. SEED-LLaMA is a local folder, as it is for users.
export HF_HOME="$FIXTURE/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ALLOW_CPU=1
export WANDB_MODE=${WANDB_MODE:-offline} SEED_LLAMA_MODEL="$FIXTURE/seed-llama"
# One thread per process: two processes do not oversubscribe two cores
export OMP_NUM_THREADS=1
# Sizes and schedules of the stand-in run (64 train, 16 val, 16 test images per dataset)
export EMB_BATCH_SIZE=16 CODEBOOK_SIZE=16 RQ_EPOCHS=3 RQ_BATCH_SIZE=32
export RQ_ARGS="--hidden-dims 32 --latent-dim 16 --kmeans-samples 64 --eval-every 0"
export T5_EPOCHS=1 T5_BATCH_SIZE=32 BEAM=8 STAGE2_EPOCHS=1 STAGE2_MAX_TRAIN_QUERIES=64 DIS_BEAMS=4
export LLAMA_EPOCHS=1 LLAMA_BATCH_SIZE=16
export RERANK_TOPK=8 RERANK_MAX_TRAIN_QUERIES=48 RERANK_MAX_VAL_QUERIES=0 RERANK_TRAIN_GALLERY_SIZE=16
export RERANK_EPOCHS=1 RERANK_BATCH_SIZE=8 RERANK_RICH_SIZE=16
export GALLERY_SIZES=16,200 BENCH_QUERIES=8 BENCH_BATCH_SIZE=4 BENCH_MAX_SECONDS=2 BENCH_ANN=
# Two-process runs take the precision each stage takes on a bf16 GPU by default, forced here so that the dtype
# paths run; one-process runs keep the CPU's float32, in which two processes evaluating their models must give
# the same rankings and scores as one (bf16 scores move with the batch a query is padded in).
GPU_DTYPES=(EMB_ARGS="--precision fp16 --num-workers 0" T5_ARGS="--mixed-precision bf16 --eval-batch-size 16"
            LLAMA_ARGS="--skip-test --mixed-precision bf16 --model-dtype bfloat16 --max-eval-queries 16"
            LLAMA_TEST_ARGS="--model-dtype bfloat16" RERANK_TRAIN_ARGS="--mixed-precision bf16 --model-dtype bfloat16"
            RERANK_TEST_ARGS="--model-dtype bfloat16")
export EMB_ARGS="--num-workers 0" T5_ARGS="--eval-batch-size 16" LLAMA_ARGS="--skip-test --max-eval-queries 16"
BENCH_FLAGS=(--curve-max-seconds 1 --no-progress)

# The launch commands of docs/real_data.md, on the CPU: torchrun, `accelerate launch --multi_gpu`, and accelerate
# with the multi-machine config played as two machines of one process each (tools/local_two_machines.sh)
TORCHRUN="torchrun --standalone --nproc_per_node 2"
ACCELERATE="accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"
TWO_MACHINES="bash tools/local_two_machines.sh configs/accelerate/multi_node.yaml"
launcher() {  # $1: processes, $2: dataset -> LAUNCH of the run
  if [ "$1" = 1 ]; then echo python; elif [ "$2" = coco ]; then echo "$TWO_MACHINES"; else echo "$TORCHRUN"; fi
}
evaluator() {  # $1: dataset -> LAUNCH of the two-process evaluation of a one-process run's models
  if [ "$1" = coco ]; then echo "$TORCHRUN"; else echo "$ACCELERATE"; fi
}

rehearse_one() {  # dataset recipe processes: one run, its checks, and for one process its two-process evaluation
  local dataset=$1 recipe=$2 procs=$3
  local out="$WORK/$recipe-${procs}p"
  local root="$out/$dataset" launch vars bench side two
  launch=$(launcher "$procs" "$dataset")
  echo "=== [rehearse] DATASET=$dataset RECIPE=$recipe, $procs process(es) (LAUNCH=$launch) -> $root"
  vars=(DATASET="$dataset" RECIPE="$recipe" DATA_DIR="$FIXTURE/$dataset" OUT_DIR="$out")
  bench=("${BENCH_FLAGS[@]}")
  if [ "$procs" = 2 ]; then vars+=("${GPU_DTYPES[@]}"); bench+=(--retriever-dtype bfloat16); fi
  env "${vars[@]}" LAUNCH="$launch" bash scripts/run_all.sh
  env "${vars[@]}" bash scripts/benchmark_efficiency.sh "${bench[@]}"
  python -m avg.experiments.rehearsal check "$root" --recipe "$recipe" --processes "$procs"
  if [ "$procs" = 1 ]; then
    # The one-process run's trained models, evaluated by two processes (sharded, gathered): the same rankings
    # and scores
    side="$WORK/$recipe-1p-by-2/$dataset"
    echo "=== [rehearse] $dataset $recipe: the one-process models evaluated by two processes -> $side"
    two=(env "${vars[@]}" LAUNCH="$(evaluator "$dataset")" AVG_SKIP_DONE=0)
    "${two[@]}" bash scripts/train_retriever_t5_stage2.sh --epochs 0 --init-from "$root/train_retriever_t5_stage2/best" \
      --out-dir "$side/train_retriever_t5_stage2" --force
    "${two[@]}" bash scripts/test_retriever_llama.sh --out-dir "$side/test_retriever_llama" --force
    "${two[@]}" bash scripts/test_reranker_llama.sh --out-dir "$side/test_reranker_llama" --force
    python -m avg.experiments.rehearsal compare "$root" "$side" --score-tol 1e-5
  fi
}

T0=$(date +%s)
mkdir -p "$WORK"
declare -a SUMMARY=() PIDS=() NAMES=()
finish() {  # wait for the oldest running job; its log goes to the output, a failure stops the rehearsal
  local pid=${PIDS[0]} name=${NAMES[0]} status=0
  wait "$pid" || status=$?
  PIDS=("${PIDS[@]:1}"); NAMES=("${NAMES[@]:1}")
  if [ "$JOBS" -gt 1 ]; then cat "$WORK/$name.log"; fi
  if [ "$status" != 0 ]; then
    echo "[rehearse] $name FAILED (status $status; log: $WORK/$name.log)" >&2
    kill "${PIDS[@]}" 2>/dev/null || true
    exit 1
  fi
  SUMMARY+=("$name: $(( $(date +%s) - $(cat "$WORK/$name.start") ))s")
}
for run in ${RUNS//,/ }; do
  IFS=: read -r dataset recipe procs <<< "$run"
  [ -f "configs/$dataset.sh" ] && [ -f "configs/recipes/$recipe.sh" ] && [[ "$procs" =~ ^[12]$ ]] \
    || { echo "error: --runs entry '$run' is not <dataset>:<recipe>:<1|2>" >&2; exit 2; }
  name="$dataset-$recipe-${procs}p"
  date +%s > "$WORK/$name.start"
  if [ "$JOBS" -gt 1 ]; then
    rehearse_one "$dataset" "$recipe" "$procs" > "$WORK/$name.log" 2>&1 &
  else
    rehearse_one "$dataset" "$recipe" "$procs" 2>&1 | tee "$WORK/$name.log" &
  fi
  PIDS+=($!); NAMES+=("$name")
  if [ "${#PIDS[@]}" -ge "$JOBS" ]; then finish; fi
done
while [ "${#PIDS[@]}" -gt 0 ]; do finish; done
echo
echo "[rehearse] done in $(( $(date +%s) - T0 ))s:"
printf '  %s\n' "${SUMMARY[@]}"
