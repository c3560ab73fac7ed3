# A new dataset: copy this file to configs/<name>.sh, set the paths (and the models, if not the paper's), then
#   DATASET=<name> bash scripts/run_all.sh          (docs/real_data.md; outputs under $OUT_DIR/<name>/)
# The caption file is Karpathy-format json (images[].filename, filepath, split, sentences[].raw); from a CSV or
# JSONL of image,caption,split:
#   python tools/convert_captions.py --input captions.csv --output data/<name>/dataset_<name>.json --image-root data/<name>/images
# Everything else -- sizes, schedules, beam, reranker lists -- comes from configs/base/real_data.sh, and the method
# from the recipe; any variable can be set here (above the last line) or in the environment.

# --- the data -------------------------------------------------------------------------------------------------
DATA_DIR=${DATA_DIR:-data/custom}
# the folder the json's filepath/filename are relative to
IMAGE_ROOT=${IMAGE_ROOT:-$DATA_DIR/images}
ANNOTATIONS=${ANNOTATIONS:-$DATA_DIR/dataset_custom.json}

# --- the models (hub names or local folders) ------------------------------------------------------------------
# CLIP: an HF CLIP (CLIP_BACKEND=hf) or an open_clip architecture + pretrained tag/checkpoint (CLIP_BACKEND=open_clip)
CLIP_BACKEND=${CLIP_BACKEND:-hf}
CLIP_MODEL=${CLIP_MODEL:-openai/clip-vit-large-patch14-336}
CLIP_PRETRAINED=${CLIP_PRETRAINED:-}
# the generative retriever (any T5), the LLaMA-family retriever and reranker, and SEED-LLaMA for the paper recipe
RETRIEVER_MODEL=${RETRIEVER_MODEL:-t5-base}
LLAMA_MODEL=${LLAMA_MODEL:-meta-llama/Llama-2-7b-hf}
SEED_LLAMA_MODEL=${SEED_LLAMA_MODEL:-}

# --- the method and the machine -------------------------------------------------------------------------------
# paper (the AVG paper's settings) or best (this project's best-measured); configs/recipes/
RECIPE=${RECIPE:-paper}
# stop at once without a GPU (ALLOW_CPU=1 runs anyway)
REQUIRE_GPU=${REQUIRE_GPU:-1}

source configs/base/real_data.sh
