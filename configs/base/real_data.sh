# Sizes and schedules of a real image-caption dataset on GPUs (the paper's where it gives them), shared by
# configs/flickr30k.sh, configs/coco.sh and a config made from configs/custom.sh, which set their paths and
# models first. Every variable can be overridden from the environment or set before this file is sourced.
OUT_DIR=${OUT_DIR:-outputs}
# stop when torch sees no GPU (scripts/common.sh); ALLOW_CPU=1 runs on the CPU anyway
REQUIRE_GPU=${REQUIRE_GPU:-1}
SEED=${SEED:-42}
# The method: paper (the AVG paper's settings) or best (this project's best-measured); configs/recipes/
RECIPE=${RECIPE:-paper}

CLIP_BACKEND=${CLIP_BACKEND:-hf}
CLIP_MODEL=${CLIP_MODEL:-openai/clip-vit-large-patch14-336}
CLIP_PRETRAINED=${CLIP_PRETRAINED:-}
EMB_BATCH_SIZE=${EMB_BATCH_SIZE:-256}

CODE_LEN=${CODE_LEN:-4}
CODEBOOK_SIZE=${CODEBOOK_SIZE:-1024}
RQ_EPOCHS=${RQ_EPOCHS:-200}
RQ_BATCH_SIZE=${RQ_BATCH_SIZE:-2048}
RQ_LR=${RQ_LR:-1e-4}
# raw M-voken codes, ties ordered inside each gallery (global: append an index over all splits)
CODE_DISAMBIGUATION=${CODE_DISAMBIGUATION:-none}

# T5 retriever (paper: T5-base, lr 1e-3, batch 128; beam 20-30 at test time)
RETRIEVER_MODEL=${RETRIEVER_MODEL:-t5-base}
MAX_TRAIN_QUERIES=${MAX_TRAIN_QUERIES:-}
T5_EPOCHS=${T5_EPOCHS:-20}
T5_BATCH_SIZE=${T5_BATCH_SIZE:-128}
T5_LR=${T5_LR:-1e-3}
BEAM=${BEAM:-20}
STAGE2_EPOCHS=${STAGE2_EPOCHS:-3}
STAGE2_MAX_TRAIN_QUERIES=${STAGE2_MAX_TRAIN_QUERIES:-0}
STAGE2_LR=${STAGE2_LR:-1e-4}
DIS_BEAMS=${DIS_BEAMS:-10}

# LLaMA-family retriever with LoRA (paper Table 6: LLaMA-7B)
LLAMA_MODEL=${LLAMA_MODEL:-meta-llama/Llama-2-7b-hf}
LLAMA_PROMPT=${LLAMA_PROMPT:-$'Caption: {query}\nImage:'}
LLAMA_EPOCHS=${LLAMA_EPOCHS:-3}
LLAMA_BATCH_SIZE=${LLAMA_BATCH_SIZE:-16}
LLAMA_LR=${LLAMA_LR:-3e-4}
# The trainer validates on val; test_retriever_llama (the next stage) tests best/ on the whole test split
LLAMA_ARGS=${LLAMA_ARGS:---skip-test}
LORA_R=${LORA_R:-8}
LORA_ALPHA=${LORA_ALPHA:-16}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
LORA_TARGETS=${LORA_TARGETS:-q_proj,k_proj,v_proj,o_proj}

# --- Reranker (avg.reranker: prepare_reranker_dataset, convert_voken_to_seed, finetune_reranker_llama, test_reranker_llama) ---
# Retriever whose top-k is reranked: a stage folder under ${OUT_DIR}/${DATASET} holding best/ (and eval/ run files)
RERANK_RETRIEVER=${RERANK_RETRIEVER:-train_retriever_t5_stage2}
# Candidates per query (BEAM must be >= RERANK_TOPK)
RERANK_TOPK=${RERANK_TOPK:-20}
# 1: reuse the retriever's eval/run_test.jsonl and eval/run_val_epoch<best>.jsonl instead of searching those splits again
RERANK_REUSE_RUNS=${RERANK_REUSE_RUNS:-1}
# Seeded subset of training captions searched to build training lists (0: all)
RERANK_MAX_TRAIN_QUERIES=${RERANK_MAX_TRAIN_QUERIES:-20000}
# Seeded subset of val queries used for model selection (0: all); test lists are always complete
RERANK_MAX_VAL_QUERIES=${RERANK_MAX_VAL_QUERIES:-1000}
# Training queries are searched among chunks of this many train images, as hard as the test gallery (0: whole train gallery)
RERANK_TRAIN_GALLERY_SIZE=${RERANK_TRAIN_GALLERY_SIZE:-1000}
# Residual k-means tokens of each image's CLIP feature appended after its vokens (0: vokens only); entries per level
RERANK_RICH_LEVELS=${RERANK_RICH_LEVELS:-0}
RERANK_RICH_SIZE=${RERANK_RICH_SIZE:-1024}
# SEED-LLaMA in HF format, a local folder (the paper recipe's reranker; without it that recipe uses LLAMA_MODEL)
SEED_LLAMA_MODEL=${SEED_LLAMA_MODEL:-}
# 1: train every weight; 0: LoRA (LORA_* above) + trainable image-token rows
RERANK_FULL_FINETUNE=${RERANK_FULL_FINETUNE:-0}
# Reranker schedule: epochs, candidate lists per micro-batch (each = RERANK_TOPK sequences), LM learning rate
RERANK_EPOCHS=${RERANK_EPOCHS:-1}
RERANK_BATCH_SIZE=${RERANK_BATCH_SIZE:-4}
RERANK_LR=${RERANK_LR:-1e-4}
# Extra reranker flags of this dataset's schedule (the method's are the recipe's RERANK_ARGS), e.g. --grad-accum 4
RERANK_TRAIN_ARGS=${RERANK_TRAIN_ARGS:-}
