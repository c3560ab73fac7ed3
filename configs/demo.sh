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
