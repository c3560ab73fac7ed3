"""Decoding benchmark: constrained beam search vs HF generate + a dict trie, on one model and device.

    python -m avg.experiments.bench decode --out-dir runs/bench_decode

Methods (all on the same model, queries and galleries, timed in interleaved repeats so that shared
or throttled cores affect them alike):

* ``hf_trie``    -- (a) HF ``generate`` + ``prefix_allowed_tokens_fn`` over a nested-dict trie,
                    KV cache on: the usual way.
* ``ours``       -- (b) ``constrained_beam_search`` (default path, full-vocabulary log-probs).
* ``ours_nomask``-- (c) the same search with no constraint (``index=None``): the cost of beam
                    search itself; HF ``generate`` without a constraint is ``hf_nomask``.
* ``ours_fast``  -- the voken-only fast path (renormalised scores; rankings may differ).

The model is a T5 built from a config with RANDOM weights (t5-small-like by default: d_model 512,
6+6 layers, 32128 + codebook-size tokens); random weights do not change the cost of decoding.
Galleries are uniform random codes. Results: a table on the console, ``bench_decode.csv`` and
``bench_decode.json`` and the table as ``bench_decode.txt`` in ``--out-dir`` (written atomically),
metrics through RunLogger.
"""
from __future__ import annotations

import argparse
import csv
import gc
import statistics
import time
import tracemalloc
from pathlib import Path

import torch
from avg.core.progress import tqdm

from avg.search.code_index import CodeIndex, DictTrie
from avg.search.beam import constrained_beam_search
from avg.core.io import atomic_open, write_json
from avg.core.seed import set_seed
from avg.core.tracking import RunLogger

PRESETS = {
    "small": dict(d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8, base_vocab=32128),
    "tiny": dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, base_vocab=1000),
}
METHODS = ("hf_trie", "ours", "ours_nomask", "ours_fast", "hf_nomask")


def build_model(preset: str, codebook_size: int, seed: int, **overrides):
    from transformers import T5Config, T5ForConditionalGeneration

    dims = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    base_vocab = dims.pop("base_vocab")
    set_seed(seed)
    cfg = T5Config(vocab_size=base_vocab + codebook_size, d_model=dims["d_model"], d_ff=dims["d_ff"],
                   d_kv=dims["d_kv"], num_layers=dims["num_layers"], num_decoder_layers=dims["num_layers"],
                   num_heads=dims["num_heads"], decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval(), base_vocab


def dict_trie_with_memory(codes: torch.Tensor) -> tuple[DictTrie, int, float]:
    """Build the dict trie under tracemalloc: bytes the Python objects hold, build seconds."""
    rows = codes.tolist()
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    trie = DictTrie(rows)
    seconds = time.perf_counter() - t0
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return trie, current, seconds


def _hf(model, ids, mask, num_beams, code_len, eos, prefix_fn):
    out = model.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams, num_return_sequences=num_beams,
                         do_sample=False, max_new_tokens=code_len + (eos is not None),
                         prefix_allowed_tokens_fn=prefix_fn, length_penalty=0.0, early_stopping=False,
                         use_cache=True, output_scores=True, return_dict_in_generate=True)
    n = ids.shape[0]
    seqs = out.sequences.view(n, num_beams, -1)[:, :, 1:1 + code_len]
    return seqs, out.sequences_scores.view(n, num_beams)


def run_method(name, model, batches, index, trie, args, voken_ids):
    eos = None if args.no_eos else 1
    seqs, scores = [], []
    for ids, mask in batches:
        if name == "hf_trie":
            s, sc = _hf(model, ids, mask, args.num_beams, args.code_len, eos, trie.prefix_allowed_tokens_fn(1, eos))
        elif name == "hf_nomask":
            s, sc = _hf(model, ids, mask, args.num_beams, args.code_len, eos, None)
        else:
            out = constrained_beam_search(
                model, ids, mask, None if name == "ours_nomask" else index, args.num_beams, eos_token_id=eos,
                voken_ids=voken_ids if name == "ours_fast" else None, code_len=args.code_len)
            s, sc = out.sequences, out.scores
        seqs.append(s)
        scores.append(sc)
    return torch.cat(seqs), torch.cat(scores)


def bench_decode(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    model, base_vocab = build_model(args.model_preset, args.codebook_size, args.seed, d_model=args.d_model,
                                    d_ff=args.d_ff, num_layers=args.num_layers, num_heads=args.num_heads)
    model.to(args.device)
    vocab = model.config.vocab_size
    voken_ids = torch.arange(base_vocab, vocab)
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(max(2, args.query_len // 2), args.query_len + 1, (args.num_queries,), generator=g)
    ids = torch.randint(2, base_vocab, (args.num_queries, args.query_len), generator=g)
    mask = (torch.arange(args.query_len)[None, :] < lengths[:, None]).long()
    ids = (ids * mask).to(args.device)
    mask = mask.to(args.device)
    bs = args.batch_size
    batches = [(ids[i:i + bs], mask[i:i + bs]) for i in range(0, args.num_queries, bs)]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")

    rows = []
    for gallery_size in args.gallery_sizes:
        codes = base_vocab + torch.randint(0, args.codebook_size, (gallery_size, args.code_len), generator=g)
        t0 = time.perf_counter()
        index = CodeIndex.from_codes(codes, vocab, device=args.device)
        index_build = time.perf_counter() - t0
        trie = trie_bytes = trie_build = None
        if "hf_trie" in methods:
            trie, trie_bytes, trie_build = dict_trie_with_memory(codes)
        del codes
        times = {m: [] for m in methods}
        outputs = {}
        # warm-up (one batch per method), then interleaved repeats
        for m in methods:
            run_method(m, model, batches[:1], index, trie, args, voken_ids)
        for _ in tqdm(range(args.repeats), desc=f"gallery {gallery_size}", leave=False):
            for m in methods:
                t0 = time.perf_counter()
                outputs[m] = run_method(m, model, batches, index, trie, args, voken_ids)
                times[m].append(time.perf_counter() - t0)
        row = {"gallery_size": gallery_size, "unique_codes": index.num_codes, "num_queries": args.num_queries,
               "batch_size": args.batch_size, "num_beams": args.num_beams, "code_len": args.code_len,
               "codebook_size": args.codebook_size, "eos_in_score": not args.no_eos, "device": str(args.device),
               "index_mb": index.nbytes / 2**20, "index_build_s": index_build,
               "dict_trie_mb": None if trie_bytes is None else trie_bytes / 2**20, "dict_trie_build_s": trie_build}
        for m in methods:
            row[f"{m}_qps"] = args.num_queries / statistics.median(times[m])
            row[f"{m}_times_s"] = [round(t, 4) for t in times[m]]
        if "ours" in methods and "hf_trie" in methods:
            row["ours_over_hf_trie"] = row["ours_qps"] / row["hf_trie_qps"]
            row["ours_over_hf_trie_per_repeat"] = [round(a / b, 3) for a, b in zip(times["hf_trie"], times["ours"])]
            a_seq, a_sc = outputs["hf_trie"]
            b_seq, b_sc = outputs["ours"]
            k = b_seq.shape[1]
            same = (a_seq[:, :k] == b_seq).flatten(1).all(1)
            row["rankings_equal_frac"] = float(same.float().mean())
            row["max_score_diff"] = float((a_sc[:, :k] - b_sc).abs().max())
        if "ours" in methods and "ours_nomask" in methods:
            row["ours_over_nomask"] = row["ours_qps"] / row["ours_nomask_qps"]
        if "ours" in methods and "ours_fast" in methods:
            same = (outputs["ours_fast"][0] == outputs["ours"][0]).flatten(1).all(1)
            row["fast_rankings_equal_frac"] = float(same.float().mean())
        rows.append(row)
        del trie, index, outputs
        gc.collect()
    return rows


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_table(rows, methods) -> str:
    head = ["gallery", "index MB", "trie MB"] + [f"{m} q/s" for m in methods] + ["b/a", "b/c", "rank eq", "max|ds|"]
    lines = [" | ".join(head)]
    for r in rows:
        cells = [str(r["gallery_size"]), _fmt(r["index_mb"]), _fmt(r["dict_trie_mb"])]
        cells += [_fmt(r.get(f"{m}_qps")) for m in methods]
        cells += [_fmt(r.get("ours_over_hf_trie")), _fmt(r.get("ours_over_nomask")),
                  _fmt(r.get("rankings_equal_frac"), ".3f"), _fmt(r.get("max_score_diff"), ".1e")]
        lines.append(" | ".join(cells))
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m avg.experiments.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode", help="constrained beam search vs HF generate + dict trie")
    d.add_argument("--out-dir", required=True, help="folder for bench_decode.{csv,json} and the log")
    d.add_argument("--gallery-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 100_000, 1_000_000],
                   help="comma-separated numbers of random gallery codes")
    d.add_argument("--code-len", type=int, default=4, help="vokens per image code (L)")
    d.add_argument("--codebook-size", type=int, default=1024, help="number of voken tokens added to the vocabulary")
    d.add_argument("--num-beams", type=int, default=20, help="beam size (= ranked list length)")
    d.add_argument("--num-queries", type=int, default=16, help="queries decoded per timed repeat")
    d.add_argument("--batch-size", type=int, default=8, help="queries per generate/search call")
    d.add_argument("--query-len", type=int, default=16, help="longest query in tokens (lengths vary, padded)")
    d.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats per method (median is reported)")
    d.add_argument("--methods", default="hf_trie,ours,ours_nomask,ours_fast",
                   help=f"comma-separated subset of {','.join(METHODS)}")
    d.add_argument("--no-eos", action="store_true",
                   help="score the L vokens only (default: the EOS after the code is scored too)")
    d.add_argument("--model-preset", choices=sorted(PRESETS), default="small", help="T5 size (random weights)")
    d.add_argument("--d-model", type=int, default=None, help="override the preset's d_model")
    d.add_argument("--d-ff", type=int, default=None, help="override the preset's d_ff")
    d.add_argument("--num-layers", type=int, default=None, help="override the preset's encoder/decoder layers")
    d.add_argument("--num-heads", type=int, default=None, help="override the preset's attention heads")
    d.add_argument("--device", default="cpu", help="torch device")
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default; on shared cores 1 gives stabler ratios)")
    d.add_argument("--seed", type=int, default=0, help="seed for the model, galleries and queries")
    args = p.parse_args(argv)

    out_dir = Path(args.out_dir)
    logger = RunLogger(out_dir, project="avg", run_name="bench_decode", config=vars(args), log_name="bench.log")
    try:
        rows = bench_decode(args)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        table = print_table(rows, methods)
        for step, r in enumerate(rows):
            scalars = {f"bench/{k}": v for k, v in r.items() if isinstance(v, (int, float)) and v is not None}
            logger.log(scalars, step=step)
        with atomic_open(out_dir / "bench_decode.txt") as f:
            f.write(table + "\n")
        write_json({"config": vars(args), "results": rows}, out_dir / "bench_decode.json")
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_open(out_dir / "bench_decode.csv") as f:
            w = csv.DictWriter(f, fieldnames=keys, lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k) for k in keys})
    finally:
        logger.finish()


if __name__ == "__main__":
    main()
