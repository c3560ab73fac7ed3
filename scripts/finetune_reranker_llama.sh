#!/usr/bin/env bash
# Stage: reranker = causal LM (SEED-LLaMA / LLaMA family; LoRA, or full fine-tuning with RERANK_FULL_FINETUNE=1)
# + MLP scoring head, listwise loss over the retriever's top-k -> ${OUT_DIR}/${DATASET}/finetune_reranker_llama/
# Multi-GPU: LAUNCH="accelerate launch" (or "torchrun --nproc_per_node 4"). Extra flags go to avg.stages.finetune_reranker_llama.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ "$RERANK_MODEL" == *llama-demo && ! -f "$RERANK_MODEL/demo_llama.json" ]]; then
  python tools/make_demo_llama.py --annotations "$ANNOTATIONS" --out-dir "$RERANK_MODEL"
fi
FT_ARGS=()
[ "${RERANK_FULL_FINETUNE:-0}" = "1" ] && FT_ARGS=(--full-finetune)
$LAUNCH -m avg.stages.finetune_reranker_llama \
  --data-dir "$RERANKER_DATA_DIR" --tokens-dir "$RERANKER_TOKENS_DIR" --model "$RERANK_MODEL" \
  --out-dir "$RERANKER_DIR" --epochs "$RERANK_EPOCHS" --batch-size "$RERANK_BATCH_SIZE" --lr "$RERANK_LR" \
  --fusion "$RERANK_FUSION" --lora-r "$LORA_R" --lora-alpha "$LORA_ALPHA" --lora-dropout "$LORA_DROPOUT" \
  --lora-target-modules "$LORA_TARGETS" --emb-dir "$EMB_DIR" --seed "$SEED" --run-name "${DATASET}-reranker" \
  "${FT_ARGS[@]}" ${RERANK_ARGS:-} ${RERANK_TRAIN_ARGS:-} "$@"
