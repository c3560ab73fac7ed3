"""Retriever evaluation: constrained beam search over a split's gallery -> run records -> Recall@K.

Shared by the T5 and LLaMA retrievers and the reranker's data preparation. Queries are batched
by token length (less padding), sharded across processes when torch.distributed is running and
gathered back in query order; memory is bounded by ``batch_size`` queries x ``num_beams`` beams.
Every returned image list is over images, not codes (see avg.search.gallery), and the one
metrics function, avg.metrics.retrieval_metrics, scores it.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from avg.core.progress import tqdm

from avg.metrics import recall_ks, retrieval_metrics
from avg.search.gallery import Gallery
from avg.retriever.prefix import prefixed_inputs
from avg.search.beam import constrained_beam_search


def logits_vocab_size(model) -> int:
    """Width of the model's output logits (may exceed len(tokenizer), as with T5's padded matrix)."""
    out = model.get_output_embeddings()
    return int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate_split(model, tokenizer, vocab, queries: Sequence[dict], gallery: Gallery, num_beams: int,
                   batch_size: int, device, *, index=None, max_length: int = 64,
                   format_query: Optional[Callable[[str], str]] = None, desc: str = "eval",
                   show_progress: bool = True, restrict_to_vokens: bool = False,
                   score_eos: bool = True, normalize: str = "vocab", prefix=None,
                   query_features: Optional[torch.Tensor] = None) -> tuple[list[dict], dict]:
    """Rank `gallery` images for each query ({"query", "image_id"[, "qid"]}).

    Returns (run records {qid, query, gold, ranked, scores} in query order, metrics from
    retrieval_metrics with gallery_size=len(gallery)). `index` is a prebuilt CodeIndex for the
    gallery (built here when None). `format_query` maps a caption to the model's input text (a
    prompt template for decoder-only models; their prompts are left-padded here).
    `restrict_to_vokens` takes the search's fast path (output head over the vokens only, scores
    renormalised over them; see avg.search.beam); the default scores with the
    full-vocabulary distribution. `score_eos` adds log p(EOS | code)
    to each code's score, matching models trained on code + EOS labels (as train_t5 does).
    `normalize="children"` ranks by log-probabilities renormalised over each prefix's allowed
    continuations (avg.search.beam; the voken-only head is then used, same result, faster).
    `prefix` (avg.retriever.prefix.QueryPrefix) with `query_features` [len(queries), D] puts each
    query's CLIP text feature in front of its words. Metrics include R@K up to the beam
    (``avg.metrics.recall_ks``): R@beam is the recall of the returned list.
    """
    rank, world = _dist()
    texts = [format_query(q["query"]) if format_query else q["query"] for q in queries]
    if prefix is not None and (query_features is None or len(query_features) != len(queries)):
        raise ValueError("a retriever with a query-feature prefix needs one feature row per query")
    mine = list(range(rank, len(queries), world))
    results = rank_queries(model, tokenizer, vocab, [texts[i] for i in mine], gallery, num_beams, batch_size, device,
                           index=index, max_length=max_length, desc=desc, show_progress=show_progress and rank == 0,
                           restrict_to_vokens=restrict_to_vokens, score_eos=score_eos, normalize=normalize,
                           prefix=prefix, query_features=query_features[mine] if prefix is not None else None)
    results = {i: results[j] for j, i in enumerate(mine)}
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, results)
        results = {i: v for part in gathered for i, v in part.items()}
    records = []
    for i, q in enumerate(queries):
        ranked, scores = results[i]
        records.append({"qid": q.get("qid", i), "query": q["query"], "gold": q["image_id"],
                        "ranked": ranked, "scores": scores})
    metrics = retrieval_metrics(records, ks=recall_ks(num_beams), gallery_size=len(gallery))
    return records, metrics


@torch.no_grad()
def rank_queries(model, tokenizer, vocab, texts: Sequence[str], gallery: Gallery, num_beams: int, batch_size: int,
                 device, *, index=None, max_length: int = 64, desc: str = "search", show_progress: bool = True,
                 restrict_to_vokens: bool = False, score_eos: bool = True, normalize: str = "vocab", prefix=None,
                 query_features: Optional[torch.Tensor] = None) -> list[tuple[list, list]]:
    """(ranked image ids, their scores) per text, in the order of ``texts``: the search of
    :func:`evaluate_split` without gold labels (the API and CLI, avg.api, call it too, so a query is
    ranked the same way everywhere). Texts are batched by token length (less padding)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if index is None:
        index = gallery.build_index(vocab, logits_vocab_size(model), device=device)
    if prefix is not None and (query_features is None or len(query_features) != len(texts)):
        raise ValueError("a retriever with a query-feature prefix needs one feature row per query")
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]] \
        if len(texts) else []
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    is_enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    start_id = model.config.decoder_start_token_id if is_enc_dec else None
    voken_ids = vocab.voken_ids.to(device) if restrict_to_vokens or normalize == "children" else None
    eos_id = tokenizer.eos_token_id if score_eos and normalize != "children" else None
    results: dict[int, tuple[list, list]] = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right" if is_enc_dec else "left"  # decoder-only prompts end where codes start
    try:
        for batch in tqdm(batches, desc=desc, disable=not show_progress, leave=False):
            enc = tokenizer([texts[i] for i in batch], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt").to(device)
            feats = query_features[batch].to(device) if prefix is not None else None
            inputs = prefixed_inputs(model, prefix, enc["input_ids"], enc["attention_mask"], feats)
            out = constrained_beam_search(model, inputs.get("input_ids"), inputs["attention_mask"], index, num_beams,
                                          decoder_start_token_id=start_id, eos_token_id=eos_id, voken_ids=voken_ids,
                                          inputs_embeds=inputs.get("inputs_embeds"), normalize=normalize)
            codes = vocab.token_ids_to_codes(out.sequences.cpu())
            scores = out.scores.float().cpu()
            valid = out.num_valid.cpu()
            for r, i in enumerate(batch):
                k = int(valid[r])
                results[i] = gallery.rank(codes[r, :k].numpy(), scores[r, :k].numpy())
    finally:
        tokenizer.padding_side = padding_side
        if was_training:
            model.train()
    return [results[i] for i in range(len(texts))]


__all__ = ["evaluate_split", "rank_queries", "logits_vocab_size"]
