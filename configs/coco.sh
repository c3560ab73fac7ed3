# MS-COCO 2014 (Karpathy split: 113,287 train incl. restval / 5,000 val / 5,000 test images).
# Put dataset_coco.json and the train2014/ + val2014/ folders under DATA_DIR (docs/real_data.md). The models:
# CLIP ViT-L/14@336 features, T5-base, LLaMA-2-7B (+ LoRA); the method is the recipe's (RECIPE, configs/recipes/).
DATA_DIR=${DATA_DIR:-data/coco}
IMAGE_ROOT=${IMAGE_ROOT:-$DATA_DIR}
ANNOTATIONS=${ANNOTATIONS:-$DATA_DIR/dataset_coco.json}
# reranker training lists are searched in chunks of this many train images (5,000: as hard as COCO's test gallery)
RERANK_TRAIN_GALLERY_SIZE=${RERANK_TRAIN_GALLERY_SIZE:-5000}
source configs/base/real_data.sh
