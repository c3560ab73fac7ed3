#!/usr/bin/env bash
# Stage: decoder-only generative retriever (LLaMA family + LoRA, paper Table 6) -> ${OUT_DIR}/${DATASET}/finetune_retriever_llama/
# Multi-GPU: LAUNCH="accelerate launch" (or "torchrun --nproc_per_node 4"); DeepSpeed through accelerate's config.
# Extra flags go to avg.stages.finetune_retriever_llama (see --help), e.g. --full-finetune, --gradient-checkpointing;
# LLAMA_ARGS (config) adds flags too, e.g. the demo's reduced schedule.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ "$LLAMA_MODEL" == *smollm2-135m && ! -f "$LLAMA_MODEL/materialized.json" ]]; then
  python tools/materialize_smollm2.py --out "$LLAMA_MODEL"
fi
$LAUNCH -m avg.stages.finetune_retriever_llama \
  --data-dir "$RETRIEVER_DATA_DIR" --codes-dir "$CODES_DIR" --model "$LLAMA_MODEL" \
  --out-dir "$RETRIEVER_LLAMA_DIR" --prompt-template "$LLAMA_PROMPT" \
  --epochs "$LLAMA_EPOCHS" --batch-size "$LLAMA_BATCH_SIZE" --lr "$LLAMA_LR" \
  --lora-r "$LORA_R" --lora-alpha "$LORA_ALPHA" --lora-dropout "$LORA_DROPOUT" --lora-target-modules "$LORA_TARGETS" \
  --num-beams "$BEAM" --seed "$SEED" ${LLAMA_ARGS:-} "$@"
