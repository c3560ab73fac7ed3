# Flickr30K (Karpathy split: 29,783 train / 1,014 val / 1,000 test images, 5 captions each).
# Put dataset_flickr30k.json and the flickr30k-images/ folder under DATA_DIR (docs/real_data.md). The models:
# CLIP ViT-L/14@336 features, T5-base, LLaMA-2-7B (+ LoRA); the method is the recipe's (RECIPE, configs/recipes/).
DATA_DIR=${DATA_DIR:-data/flickr30k}
IMAGE_ROOT=${IMAGE_ROOT:-$DATA_DIR/flickr30k-images}
ANNOTATIONS=${ANNOTATIONS:-$DATA_DIR/dataset_flickr30k.json}
source configs/base/real_data.sh
