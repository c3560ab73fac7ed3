"""Where a generative retriever loses the gold image: per-position diagnostics of one evaluation.

``code_diagnostics`` reads a split's queries, its gallery and the run records of the search, and
runs one teacher-forced pass of the model on each query's gold code:

* ``positions[t]``: given the gold prefix ``c_<t``, how often the gold voken is the model's top
  choice among the continuations the gallery allows (``gold_is_top``, %), its log-probability
  renormalised over them (``gold_logprob``, nats), how many continuations there were
  (``children``; at an evidence level, avg.search.code_index, the level's alphabet, read at the first step), and the log of the probability mass the full-vocabulary distribution puts on
  them (``allowed_log_mass``: 0 when the model never wastes mass on tokens that cannot follow);
* ``first_miss``: for every query, the first position where the top-ranked image's code differs
  from the gold code (``"1"`` .. ``"L"``), or ``"same_code"`` (a hit, or an image sharing the gold's
  code) -- in % of queries;
* ``given_prefix[t - 1]``: the model's code R@1 when the first ``t`` vokens are given right (t = 1 .. L - 1):
  over a seeded sample of the queries, how often the gold code scores highest among the gallery's codes
  that share its first ``t`` vokens (every such code teacher-forced, the search's score), with the mean
  number of those codes. Position 0 is the search itself. The drop from ``t`` to ``t - 1`` is the recall
  lost at voken ``t``; at ``t = 1`` the rest of the code is read by a model that already has the coarse
  voken right. This bounds what the model can do with these codes where the decoded-code ceiling (which
  reads only the pooled vector the RQ-VAE quantises) does not: layout vokens, evidence levels;
* ``r1_unique_code`` / ``r1_shared_code``: R@1 of queries whose gold image is alone on its code in
  this gallery vs. shares it with others (on the first ``num_levels`` positions, so with a
  disambiguation position it is the images that need one), with the query counts.

No I/O; the stage writes the dict (eval/diagnostics_<split>.json) and logs it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from avg.metrics import first_hit_rank
from avg.retriever.prefix import prefixed_inputs


@torch.no_grad()
def code_diagnostics(model, tokenizer, vocab, queries: Sequence[dict], gallery, records: Sequence[dict], device, *,
                     index=None, prefix=None, query_features: Optional[torch.Tensor] = None, batch_size: int = 64,
                     max_length: int = 64, prefix_queries: int = 1000, seed: int = 0) -> dict:
    """The diagnostics dict of the module docstring (encoder-decoder models)."""
    from avg.retriever.evaluate import logits_vocab_size

    device = torch.device(device)
    if index is None:
        index = gallery.build_index(vocab, logits_vocab_size(model), device=device)
    length = vocab.code_len
    top = np.zeros(length)
    logprob = np.zeros(length)
    mass = np.zeros(length)
    children = np.zeros(length)
    n = 0
    was_training = model.training
    model.eval()
    start = model.config.decoder_start_token_id
    for lo in range(0, len(queries), batch_size):
        batch = queries[lo:lo + batch_size]
        enc = tokenizer([q["query"] for q in batch], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)
        feats = query_features[lo:lo + batch_size] if prefix is not None else None
        inputs = prefixed_inputs(model, prefix, enc["input_ids"], enc["attention_mask"], feats)
        gold = vocab.code_to_token_ids(np.array([q["code"] for q in batch], dtype=np.int64)).to(device)
        dec = torch.cat([torch.full((len(batch), 1), start, dtype=torch.long, device=device), gold[:, :-1]], 1)
        logits = model(**inputs, decoder_input_ids=dec, use_cache=False).logits.float()
        nodes = torch.zeros(len(batch), dtype=torch.long, device=device)
        for t in range(length):
            tok, valid = index.scored_tokens(nodes, t)
            step = logits[:, index.scored_step(t)]
            allowed = step.gather(1, tok).masked_fill(~valid, float("-inf"))
            g = step.gather(1, gold[:, t:t + 1]).squeeze(1)
            lse = allowed.logsumexp(1)
            top[t] += float((g >= allowed.max(1).values).sum())
            logprob[t] += float((g - lse).sum())
            mass[t] += float((lse - step.logsumexp(1)).sum())
            children[t] += float(valid.sum())
            nodes = index.find_child(nodes, t, gold[:, t])
            if bool((nodes < 0).any()):
                row = lo + int((nodes < 0).nonzero()[0])
                raise ValueError(f"query {row} ({queries[row]['query']!r}): its gold code {queries[row]['code']} is not "
                                 f"in the gallery")
        n += len(batch)
    positions = [{"position": t + 1, "gold_is_top": round(100.0 * top[t] / max(n, 1), 2),
                  "gold_logprob": round(logprob[t] / max(n, 1), 4), "allowed_log_mass": round(mass[t] / max(n, 1), 4),
                  "children": round(children[t] / max(n, 1), 2)} for t in range(length)]
    given = given_prefix_recall(model, tokenizer, vocab, queries, gallery, device, index=index, prefix=prefix,
                                query_features=query_features, max_length=max_length, max_queries=prefix_queries,
                                seed=seed, batch_size=batch_size)
    if was_training:
        model.train()
    return {"num_queries": n, "positions": positions, "given_prefix": given,
            **run_diagnostics(records, gallery, vocab.num_levels)}


@torch.no_grad()
def given_prefix_recall(model, tokenizer, vocab, queries: Sequence[dict], gallery, device, *, index=None, prefix=None,
                        query_features: Optional[torch.Tensor] = None, max_length: int = 64, max_queries: int = 1000,
                        seed: int = 0, batch_size: int = 64, pair_batch: int = 2048) -> list[dict]:
    """``given_prefix`` of the module docstring: code R@1 given the gold's first t vokens, t = 1 .. L - 1."""
    from avg.search.code_index import code_log_probs
    from avg.retriever.evaluate import logits_vocab_size

    device = torch.device(device)
    if index is None:
        index = gallery.build_index(vocab, logits_vocab_size(model), device=device)
    length = vocab.code_len
    if length < 2 or not queries or max_queries <= 0:
        return []
    rows = np.arange(len(queries))
    if len(rows) > max_queries:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_queries, replace=False))
    codes = gallery.token_codes(vocab).to(device)  # [U, L] distinct codes as token ids
    gold = vocab.code_to_token_ids(np.array([queries[i]["code"] for i in rows], dtype=np.int64)).to(device)
    was_training = model.training
    model.eval()
    start = model.config.decoder_start_token_id
    hits = np.zeros(length - 1)
    sizes = np.zeros(length - 1)
    for lo in range(0, len(rows), batch_size):
        part = rows[lo:lo + batch_size]
        enc = tokenizer([queries[i]["query"] for i in part], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)
        feats = query_features[torch.as_tensor(part)] if prefix is not None else None
        inputs = prefixed_inputs(model, prefix, enc["input_ids"], enc["attention_mask"], feats)
        hidden = model.get_encoder()(**{k: v for k, v in inputs.items() if k != "attention_mask"},
                                     attention_mask=inputs["attention_mask"]).last_hidden_state
        g = gold[lo:lo + len(part)]
        # every (query, code) pair whose code shares at least the gold's first voken, scored once
        share = (codes[None, :, :] == g[:, None, :]).long().cumprod(2).sum(2)  # [B, U] shared prefix length
        q_idx, c_idx = (share >= 1).nonzero(as_tuple=True)
        scores = torch.empty(q_idx.numel(), device=device)
        for a in range(0, q_idx.numel(), pair_batch):
            qi, ci = q_idx[a:a + pair_batch], c_idx[a:a + pair_batch]
            target = codes[ci]
            dec = torch.cat([torch.full((len(ci), 1), start, dtype=torch.long, device=device), target[:, :-1]], 1)
            logits = model(encoder_outputs=(hidden[qi],), attention_mask=inputs["attention_mask"][qi],
                           decoder_input_ids=dec, use_cache=False).logits
            scores[a:a + pair_batch] = code_log_probs(logits, target, index).sum(1)
        shared = share[q_idx, c_idx]
        is_gold = shared == length
        gold_score = torch.full((len(part),), float("-inf"), device=device)
        gold_score[q_idx[is_gold]] = scores[is_gold]
        for t in range(1, length):
            under = shared >= t
            beats = under & ~is_gold & (scores > gold_score[q_idx])
            lost = torch.zeros(len(part), dtype=torch.long, device=device).index_add_(0, q_idx, beats.long())
            hits[t - 1] += float((lost == 0).sum())
            sizes[t - 1] += float(under.sum())
    if was_training:
        model.train()
    n = len(rows)
    return [{"position": t, "code_r1": round(100.0 * hits[t - 1] / n, 2), "codes": round(sizes[t - 1] / n, 2),
             "num_queries": n} for t in range(1, length)]


def run_diagnostics(records: Sequence[dict], gallery, num_levels: int) -> dict:
    """``first_miss`` and the R@1 split by code sharing (module docstring), from run records."""
    code_of = {i: tuple(c[:num_levels]) for i, c in gallery.code_of().items()}
    full_code = gallery.code_of()
    sharing: dict = {}
    for c in code_of.values():
        sharing[c] = sharing.get(c, 0) + 1
    first_miss: dict = {}
    hits = {"unique": [0, 0], "shared": [0, 0]}
    for rec in records:
        gold = rec["gold"][0] if isinstance(rec["gold"], (list, tuple)) else rec["gold"]
        if gold not in full_code:
            continue
        ranked = rec["ranked"]
        if ranked:
            a, b = full_code.get(ranked[0]), full_code[gold]
            pos = next((t + 1 for t in range(len(b)) if a is None or a[t] != b[t]), None)
            key = "same_code" if pos is None else str(pos)
        else:
            key = "no_result"
        first_miss[key] = first_miss.get(key, 0) + 1
        kind = "shared" if sharing[code_of[gold]] > 1 else "unique"
        hits[kind][0] += int(first_hit_rank(ranked, rec["gold"]) == 1)
        hits[kind][1] += 1
    total = max(sum(first_miss.values()), 1)
    order = sorted(first_miss, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    return {
        "first_miss": {k: round(100.0 * first_miss[k] / total, 2) for k in order},
        "r1_unique_code": round(100.0 * hits["unique"][0] / hits["unique"][1], 2) if hits["unique"][1] else None,
        "r1_shared_code": round(100.0 * hits["shared"][0] / hits["shared"][1], 2) if hits["shared"][1] else None,
        "queries_unique_code": hits["unique"][1],
        "queries_shared_code": hits["shared"][1],
    }


def format_diagnostics(d: dict) -> str:
    """One log line."""
    pos = " ".join(f"p{p['position']}:top={p['gold_is_top']:.1f}%/lp={p['gold_logprob']:.2f}/mass={p['allowed_log_mass']:.2f}"
                   for p in d.get("positions", []))
    miss = " ".join(f"{k}={v:.1f}%" for k, v in d.get("first_miss", {}).items())
    given = " ".join(f"{g['position']}:{g['code_r1']:.1f}%/{g['codes']:.1f}" for g in d.get("given_prefix", []))
    return (f"gold given its prefix: {pos} | code R@1 / codes given the gold's first t vokens: {given} | "
            f"first position the top code differs: {miss} | R@1 unique code "
            f"{d.get('r1_unique_code')} ({d.get('queries_unique_code')} q) vs shared {d.get('r1_shared_code')} "
            f"({d.get('queries_shared_code')} q)")


__all__ = ["code_diagnostics", "given_prefix_recall", "run_diagnostics", "format_diagnostics"]
