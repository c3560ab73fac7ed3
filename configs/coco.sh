# MS-COCO 2014 (Karpathy split: 113,287 train incl. restval / 5,000 val / 5,000 test images).
# Put dataset_coco.json and the train2014/ + val2014/ folders under DATA_DIR. The paper's settings:
# CLIP ViT-L/14@336 features, shared codebook of 1024 vokens, code length 4, T5-base, beam 20-30.
DATA_DIR=${DATA_DIR:-data/coco}
IMAGE_ROOT=${IMAGE_ROOT:-$DATA_DIR}
ANNOTATIONS=${ANNOTATIONS:-$DATA_DIR/dataset_coco.json}
OUT_DIR=${OUT_DIR:-outputs}
SEED=${SEED:-42}

CLIP_BACKEND=${CLIP_BACKEND:-hf}
CLIP_MODEL=${CLIP_MODEL:-openai/clip-vit-large-patch14-336}
CLIP_PRETRAINED=${CLIP_PRETRAINED:-}
EMB_BATCH_SIZE=${EMB_BATCH_SIZE:-256}

CODE_LEN=${CODE_LEN:-4}
CODEBOOK_SIZE=${CODEBOOK_SIZE:-1024}
RQ_EPOCHS=${RQ_EPOCHS:-200}
RQ_BATCH_SIZE=${RQ_BATCH_SIZE:-2048}
RQ_LR=${RQ_LR:-1e-4}
