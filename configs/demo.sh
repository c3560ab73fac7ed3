# Demo: a synthetic dataset of rendered scenes with templated captions and a small CLIP trained on
# it (built by tools/make_demo_assets.py; no downloads). Every variable can be overridden from the
# environment.
DATA_DIR=${DATA_DIR:-data/demo}
IMAGE_ROOT=${IMAGE_ROOT:-$DATA_DIR/images}
ANNOTATIONS=${ANNOTATIONS:-$DATA_DIR/dataset_demo.json}
OUT_DIR=${OUT_DIR:-outputs}
SEED=${SEED:-42}
# The method: best (this project's best-measured) or paper (the AVG paper's settings); configs/recipes/
RECIPE=${RECIPE:-best}

# prepare_emb: open_clip model name (configs in avg/models/clip_configs) and checkpoint
CLIP_BACKEND=${CLIP_BACKEND:-open_clip}
CLIP_MODEL=${CLIP_MODEL:-avg-demo-vit}
CLIP_PRETRAINED=${CLIP_PRETRAINED:-$DATA_DIR/clip/avg_demo_clip.pt}
EMB_BATCH_SIZE=${EMB_BATCH_SIZE:-256}

# RQ-VAE image tokenizer
CODE_LEN=${CODE_LEN:-4}
CODEBOOK_SIZE=${CODEBOOK_SIZE:-256}
RQ_EPOCHS=${RQ_EPOCHS:-30}
RQ_BATCH_SIZE=${RQ_BATCH_SIZE:-512}
RQ_LR=${RQ_LR:-1e-3}
# Codes: raw M vokens; images sharing a code are ordered inside each gallery by a seeded rule
# (global: append an index over all splits, the earlier default)
CODE_DISAMBIGUATION=${CODE_DISAMBIGUATION:-none}

# T5 retriever (a small T5 built by tools/make_demo_t5.py; real configs use t5-base)
RETRIEVER_MODEL=${RETRIEVER_MODEL:-$DATA_DIR/t5-demo}
MAX_TRAIN_QUERIES=${MAX_TRAIN_QUERIES:-}
T5_EPOCHS=${T5_EPOCHS:-1}
T5_BATCH_SIZE=${T5_BATCH_SIZE:-128}
T5_LR=${T5_LR:-1e-3}
# Beam of the evaluation search: its top-50 is what the rerankers reorder
BEAM=${BEAM:-50}
STAGE2_EPOCHS=${STAGE2_EPOCHS:-1}
# Stage 2 over a seeded half of the 50,000 training captions (about 200 steps): the one-epoch stage-1 T5 is underfit, and
# stage 2 needs this many steps to beat it beyond the seeds' spread (docs/results.md, "Over seeds"); 10,000 (81 steps) did not
STAGE2_MAX_TRAIN_QUERIES=${STAGE2_MAX_TRAIN_QUERIES:-25000}
STAGE2_LR=${STAGE2_LR:-1e-3}
DIS_BEAMS=${DIS_BEAMS:-10}

# LLaMA-family retriever. Demo default: a small random LLaMA (0.55M weights) with a tokenizer trained on
# the demo captions (tools/make_demo_llama.py -> $DATA_DIR/llama-demo, cached), fully fine-tuned (LoRA
# on random weights learns nothing) on a seeded 3,000 of the 50,000 training captions (94 steps of 32),
# val on a seeded 200 queries, then test_retriever_llama on a seeded 500 of the 5,000 test queries:
# about 2 minutes on 2 cores. The pretrained SmolLM2-135M + LoRA path (docs/results.md, "SmolLM2-135M as the retriever"):
#   LLAMA_MODEL=data/smollm2-135m LLAMA_BATCH_SIZE=16 LLAMA_LR=3e-4 \
#   LLAMA_ARGS="--max-train-queries 640 --voken-lr 2e-3 --max-eval-queries 200 --skip-test" bash scripts/finetune_retriever_llama.sh
LLAMA_MODEL=${LLAMA_MODEL:-$DATA_DIR/llama-demo}
LLAMA_PROMPT=${LLAMA_PROMPT:-$'Caption: {query}\nImage:'}
LLAMA_EPOCHS=${LLAMA_EPOCHS:-1}
LLAMA_BATCH_SIZE=${LLAMA_BATCH_SIZE:-32}
LLAMA_LR=${LLAMA_LR:-1e-3}
LLAMA_ARGS=${LLAMA_ARGS:---full-finetune --max-train-queries 3000 --max-eval-queries 200 --eval-train-queries 0 --skip-test}
LLAMA_TEST_ARGS=${LLAMA_TEST_ARGS:---max-queries 500}
LORA_R=${LORA_R:-8}
LORA_ALPHA=${LORA_ALPHA:-16}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
LORA_TARGETS=${LORA_TARGETS:-q_proj,k_proj,v_proj,o_proj}

# --- run_all.sh and the experiment grid (scripts/run_grid.sh, python -m avg.experiments.grid) ---
# DEMO_TOOLS=1: run_all.sh also builds the demo assets, the demo T5 and the demo LLaMA (each cached).
DEMO_TOOLS=${DEMO_TOOLS:-1}
# The grid runs the demo with reduced schedules (GRID_REDUCED=1; 0 = the schedules above):
# T5 stage 1 one epoch over a seeded 20,000 of the 50,000 training captions, val only after it and
# no train-query eval; stage 2 one epoch over a seeded 2,000; the LLaMA as above. The RQ-VAE keeps
# its 30 epochs (24 s). Test sets are complete (5,000 queries) except the LLaMA's seeded 500.
GRID_REDUCED=${GRID_REDUCED:-1}
GRID_REDUCED_ENV=${GRID_REDUCED_ENV:-T5_EPOCHS=1 MAX_TRAIN_QUERIES=20000 STAGE2_MAX_TRAIN_QUERIES=2000}
GRID_REDUCED_T5_ARGS=${GRID_REDUCED_T5_ARGS:---eval-every 0 --eval-train-queries 0}
# Backbone study: name=kind:model (kind t5 or llama), space-separated.
GRID_BACKBONES=${GRID_BACKBONES:-t5-demo=t5:$DATA_DIR/t5-demo llama-demo=llama:$DATA_DIR/llama-demo}

# --- Reranker (avg.reranker: prepare_reranker_dataset, convert_voken_to_seed, finetune_reranker_llama, test_reranker_llama) ---
# Retriever whose top-k is reranked: a stage folder under ${OUT_DIR}/${DATASET} holding best/ (and eval/ run files)
RERANK_RETRIEVER=${RERANK_RETRIEVER:-train_retriever_t5_stage2}
# Candidates per query (BEAM must be >= RERANK_TOPK); the embedding rerank (scripts/rerank_embed.sh) uses it too
RERANK_TOPK=${RERANK_TOPK:-50}
# 1: reuse the retriever's eval/run_test.jsonl and eval/run_val_epoch<best>.jsonl instead of searching those splits again
RERANK_REUSE_RUNS=${RERANK_REUSE_RUNS:-1}
# Seeded subset of training captions that get training lists (0: all)
RERANK_MAX_TRAIN_QUERIES=${RERANK_MAX_TRAIN_QUERIES:-10000}
# Seeded subset of val queries used for model selection (0: all); test lists are always complete
RERANK_MAX_VAL_QUERIES=${RERANK_MAX_VAL_QUERIES:-1000}
# Training lists come from chunks of this many train images, as hard as the test gallery (0: whole train gallery);
# searched by the retriever, or mined by CLIP with RERANK_TRAIN_CANDIDATES=clip
RERANK_TRAIN_GALLERY_SIZE=${RERANK_TRAIN_GALLERY_SIZE:-1000}
# Residual k-means tokens of each image's CLIP feature appended after its vokens (0: vokens only); entries per level
RERANK_RICH_LEVELS=${RERANK_RICH_LEVELS:-0}
RERANK_RICH_SIZE=${RERANK_RICH_SIZE:-256}
# 1: train every weight (right for a random model); 0: LoRA (LORA_* above) + trainable image-token rows
RERANK_FULL_FINETUNE=${RERANK_FULL_FINETUNE:-1}
# Reranker schedule: epochs, candidate lists per micro-batch (each RERANK_TOPK candidates; with late interaction
# the query is read once per list), LM learning rate.
# One epoch: over three, training never lifted val R@1 above the untrained start on the demo (docs/results.md,
# "What the demo does and prints"); one keeps the stage shown end to end inside the 15-minute budget.
RERANK_EPOCHS=${RERANK_EPOCHS:-1}
RERANK_BATCH_SIZE=${RERANK_BATCH_SIZE:-64}
RERANK_LR=${RERANK_LR:-1e-3}
# The demo pins its reranker (a recipe variable) to what fits its CPU budget: late interaction (the LM reads the
# query once; the head scores each candidate from it and the CLIP features) + the CLIP cosine fused, one epoch. The
# best recipe's grid head needs a longer schedule (docs/reranking.md).
RERANK_ARGS=${RERANK_ARGS:---late-interaction --query-pooling mean --embed-fusion learned}
RERANK_TRAIN_ARGS=${RERANK_TRAIN_ARGS:---head-lr 2e-3}
