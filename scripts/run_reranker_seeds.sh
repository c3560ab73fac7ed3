#!/usr/bin/env bash
# The LM reranker over several seeds on one trained retriever, then mean ± std per system (avg.experiments.seeds):
#   SEEDS="42 1 2" bash scripts/run_reranker_seeds.sh          # after scripts/demo.sh (or run_all.sh)
# The candidate lists are prepared once, deeper than the single-run stage's, in ${STAGE_ROOT}/prepare_reranker_dataset_seeds:
# training lists mined by CLIP over all training captions (chunks of RERANK_TRAIN_GALLERY_SIZE images), val and
# test the retriever's own run files over all their queries. Each seed then trains the reranker in
# ${SEEDS_DIR:-${OUT_DIR}/reranker_seeds}/seed_<s>/${DATASET}/finetune_reranker_llama (SEED=<s>, the config's RERANK_* settings)
# and reranks the test lists into .../test_reranker_llama; the CLIP baseline, the retriever and the embedding rerank
# are linked in, so the table shows them and pairs the reranker with its input.
# Finished seeds are skipped (the stages' manifests); a killed seed resumes from its last checkpoint.
# The grid-head study of docs/results.md (study D):
#   RERANK_EPOCHS=5 RERANK_BATCH_SIZE=128 RERANK_LR=5e-4 \
#   RERANK_ARGS="--head-lr 5e-4 --head-inner 128 --late-interaction --query-pooling mean --embed-fusion learned --grid-head 8 --train-topk 16 --train-lists found --fit-embed-weight" \
#   SEEDS="42 1 2" bash scripts/run_reranker_seeds.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
source scripts/common.sh
# all seeds of the study in one wandb group; each run's config holds its seed
export AVG_WANDB_GROUP=${AVG_WANDB_GROUP:-$DATASET-$RECIPE-reranker-seeds-$(date +%Y%m%d-%H%M%S)}
SEEDS=${SEEDS:-42 1 2}
SEEDS_DIR=${SEEDS_DIR:-$OUT_DIR/reranker_seeds}
LISTS="${RERANKER_DATA_DIR}_seeds"
# output folders from the stage registry (a failing lookup stops here, under set -e)
RERANKER_OUT=$(stage_out finetune_reranker_llama); RERANKER_TEST_OUT=$(stage_out test_reranker_llama)
EMB_OUT=$(stage_out prepare_emb); CLIP_OUT=$(stage_out eval_clip_baseline); TOKENS_OUT=$(stage_out convert_voken_to_seed)
EMBED_OUT=$(stage_out rerank_embed)
for need in "$EMB_OUT" "$CLIP_OUT" "$RERANK_RETRIEVER/best" "$TOKENS_OUT"; do
  if [ ! -e "$STAGE_ROOT/$need" ]; then
    echo "error: $STAGE_ROOT/$need is missing: run scripts/demo.sh (or scripts/run_all.sh) first" >&2
    exit 2
  fi
done
export AVG_SKIP_DONE=1  # up-to-date lists and finished seeds return at once
T0=$(date +%s)
echo "=== [run_reranker_seeds] lists -> $LISTS"
RERANK_MAX_TRAIN_QUERIES=0 RERANK_MAX_VAL_QUERIES=0 RERANK_TRAIN_CANDIDATES=clip RERANK_REUSE_RUNS=1 \
  bash scripts/prepare_reranker_dataset.sh --out-dir "$LISTS"
for s in $SEEDS; do
  seed_root="$SEEDS_DIR/seed_$s/$DATASET"
  mkdir -p "$seed_root"
  for shared in "$CLIP_OUT" "$RERANK_RETRIEVER" "$EMBED_OUT"; do  # the same for every seed: rows of the table
    if [ -e "$STAGE_ROOT/$shared" ]; then
      ln -sfn "$(realpath --relative-to="$seed_root" "$STAGE_ROOT/$shared")" "$seed_root/$shared"
    fi
  done
  echo "=== [run_reranker_seeds] seed $s -> $seed_root/$RERANKER_OUT"
  t=$(date +%s)
  SEED=$s bash scripts/finetune_reranker_llama.sh --data-dir "$LISTS" --out-dir "$seed_root/$RERANKER_OUT" \
    --run-name "${DATASET}-reranker-seed$s"
  SEED=$s bash scripts/test_reranker_llama.sh --data-dir "$LISTS" --reranker-dir "$seed_root/$RERANKER_OUT/best" \
    --out-dir "$seed_root/$RERANKER_TEST_OUT" --run-name "${DATASET}-reranker-test-seed$s"
  echo "=== [run_reranker_seeds] seed $s done in $(( $(date +%s) - t ))s"
done
echo "=== [run_reranker_seeds] ${SEEDS// /, } in $(( $(date +%s) - T0 ))s"
python -m avg.experiments.seeds "$SEEDS_DIR" --dataset "$DATASET" --seeds $SEEDS
