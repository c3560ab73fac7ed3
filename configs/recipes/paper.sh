# Recipe "paper": the method as the AVG paper describes it (RECIPE=paper; sourced by scripts/common.sh after the
# dataset's config). Only the method is set here; data, sizes and schedules belong to configs/<dataset>.sh, and
# every variable can still be overridden from the environment. docs/real_data.md lists both recipes.
# Generative retriever: full-vocabulary score in the loss, s_j and the search (eqs. 7-9); one token per codebook
# entry shared by every level (Sec. 3.2); the caption's words only (no query-feature prefix).
T5_SCORE=${T5_SCORE:-vocab}
VOKEN_TOKENS=${VOKEN_TOKENS:-shared}
T5_QUERY_PREFIX=${T5_QUERY_PREFIX:-0}
# Stage 2 (eq. 10): lambda = 1 on every list, the positive put in where the beam missed it (eq. 8)
DIS_WEIGHT=${DIS_WEIGHT:-1.0}
DIS_TEMPERATURE=${DIS_TEMPERATURE:-1.0}
DIS_LISTS=${DIS_LISTS:-all}
# Reranker: SEED-LLaMA (HF format; SEED_LLAMA_MODEL) with an MLP head over the query and the candidate's image
# tokens, trained on the retriever's own top-k of training captions; its score alone orders the list. Without
# SEED_LLAMA_MODEL the LLaMA of the config reads the same tokens (added to its vocabulary).
RERANK_MODEL=${RERANK_MODEL:-${SEED_LLAMA_MODEL:-$LLAMA_MODEL}}
RERANK_TRAIN_CANDIDATES=${RERANK_TRAIN_CANDIDATES:-retriever}
RERANK_FUSION=${RERANK_FUSION:-none}
RERANK_ARGS=${RERANK_ARGS:-}
# The image's pooled CLIP vector only (no patch grid)
EMB_IMAGE_GRID=${EMB_IMAGE_GRID:-0}
