#!/usr/bin/env bash
# The retriever and reranker stages over several seeds, then mean ± std per system (avg.experiments.seeds):
#   SEEDS="0 1 2" bash scripts/run_seeds.sh            # after scripts/demo.sh (it needs prepare_emb/ and the demo assets)
# Each seed runs SEED_STAGES (RQ-VAE onwards: codes, retriever data, T5 stages 1 and 2, embedding rerank,
# LM reranker) in ${SEEDS_DIR:-${OUT_DIR}/seeds}/seed_<s>/${DATASET}/ with SEED=<s>; the CLIP features and the CLIP
# baseline are shared (links to ${OUT_DIR}/${DATASET}/), so every system of every seed sees the same features.
# Finished seeds are skipped (run_all's manifests); options go to run_all.sh (--force, --dry-run, ...).
# A variant over the same seeds: its own SEEDS_DIR and the variables it changes, e.g.
#   SEEDS_DIR=outputs/seeds_no_prefix T5_QUERY_PREFIX=0 bash scripts/run_seeds.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
source scripts/common.sh
# all seeds of the study in one wandb group; each run's config holds its seed
export AVG_WANDB_GROUP=${AVG_WANDB_GROUP:-$DATASET-$RECIPE-seeds-$(date +%Y%m%d-%H%M%S)}
SEEDS=${SEEDS:-0 1 2}
SEED_STAGES=${SEED_STAGES:-train_rqvae,generate_codes,prepare_retriever_dataset,train_retriever_t5,train_retriever_t5_stage2,rerank_embed,prepare_reranker_dataset,convert_voken_to_seed,finetune_reranker_llama,test_reranker_llama,report}
MAIN_ROOT="$STAGE_ROOT"
SEEDS_DIR=${SEEDS_DIR:-$OUT_DIR/seeds}
EMB_OUT=$(stage_out prepare_emb); CLIP_OUT=$(stage_out eval_clip_baseline)  # (a failing lookup stops here)
SHARED=("$EMB_OUT" "$CLIP_OUT")  # CLIP features and the two-tower: one for all seeds
for shared in "${SHARED[@]}"; do
  if [ ! -f "$MAIN_ROOT/$shared/stage.json" ]; then
    echo "error: $MAIN_ROOT/$shared is missing: run scripts/demo.sh (or run_all.sh --stages prepare_emb,eval_clip_baseline) first" >&2
    exit 2
  fi
done
T0=$(date +%s)
for s in $SEEDS; do
  seed_out="$SEEDS_DIR/seed_$s"
  mkdir -p "$seed_out/$DATASET"
  for shared in "${SHARED[@]}"; do
    ln -sfn "$(realpath --relative-to="$seed_out/$DATASET" "$MAIN_ROOT/$shared")" "$seed_out/$DATASET/$shared"
  done
  echo "=== [run_seeds] seed $s -> $seed_out/$DATASET"
  t=$(date +%s)
  SEED=$s OUT_DIR="$seed_out" bash scripts/run_all.sh --stages "$SEED_STAGES" "$@"
  echo "=== [run_seeds] seed $s done in $(( $(date +%s) - t ))s"
done
case " $* " in *" --dry-run "*) exit 0 ;; esac
echo "=== [run_seeds] ${SEEDS// /, } in $(( $(date +%s) - T0 ))s"
python -m avg.experiments.seeds "$SEEDS_DIR" --dataset "$DATASET" --seeds $SEEDS
