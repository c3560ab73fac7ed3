# Recipe "best": this project's best-measured method on the demo (RECIPE=best; sourced by scripts/common.sh after
# the dataset's config). Only the method is set here; data, sizes and schedules belong to configs/<dataset>.sh,
# and every variable can still be overridden from the environment. docs/results.md has the studies behind each
# choice; docs/real_data.md lists both recipes.
# Generative retriever: codes scored renormalised over the gallery's allowed continuations (loss, s_j, search);
# one token range per level; 4 soft tokens from the query's CLIP text feature before its words.
T5_SCORE=${T5_SCORE:-children}
VOKEN_TOKENS=${VOKEN_TOKENS:-per-level}
T5_QUERY_PREFIX=${T5_QUERY_PREFIX:-4}
# Stage 2: lambda = 3 on the lists whose beam found the positive
DIS_WEIGHT=${DIS_WEIGHT:-3.0}
DIS_TEMPERATURE=${DIS_TEMPERATURE:-1.0}
DIS_LISTS=${DIS_LISTS:-found}
# Reranker: the LM reads the query once; a grid head scores each candidate's ViT patch grid from it, added to a
# learned multiple of the CLIP cosine (its start fitted on the training lists); trained on CLIP-mined lists
# that hold their positive, cut to 16; the retriever's score fused with a weight chosen on val.
RERANK_MODEL=${RERANK_MODEL:-$LLAMA_MODEL}
RERANK_TRAIN_CANDIDATES=${RERANK_TRAIN_CANDIDATES:-clip}
RERANK_FUSION=${RERANK_FUSION:-val}
RERANK_ARGS=${RERANK_ARGS:---late-interaction --query-pooling mean --embed-fusion learned --fit-embed-weight --grid-head 8 --head-inner 128 --train-topk 16 --train-lists found}
# prepare_emb also keeps each image's ViT patch tokens pooled to 4 x 4 (what the grid head reads)
EMB_IMAGE_GRID=${EMB_IMAGE_GRID:-4}
