"""The first run on a GPU machine: does every part of the pipeline train and search there, how fast, in how much memory.

    bash scripts/gpu_check.sh                 # on a GPU (one H100/H200/A100): real sizes, under 8 minutes
    bash scripts/gpu_check.sh --dry-run       # the same checks on the CPU at tiny sizes (bash scripts/test.sh runs it)

Checks, in order (each isolated: a failure is recorded and the next one runs):

* ``stages_tiny``: the real stage modules on the rehearsal fixture's stand-ins (tools/make_rehearsal_fixture.py),
  in one process, each a few steps under bf16 autocast: CLIP features, the RQ-VAE, codes, retriever data, T5
  stages 1 and 2, the LLaMA + LoRA retriever and its test, reranker lists, the SEED conversion, the grid-head
  reranker and its test;
* ``rqvae_real``, ``t5_stage1_real_bf16``, ``t5_stage1_real_fp32_tf32``, ``t5_stage2_real``: a few optimizer steps at
  the real configs' shapes (768-d CLIP features, a 1024-entry codebook, M = 4; T5-base with 4 x 1024 voken rows,
  batch 128) from random weights: seconds per step and peak memory;
* ``search_cuda_matches_cpu``: the constrained search of one fixed model on the GPU ranks every query as on the
  CPU (float32, TF32 off), with the paper's and the children score;
* ``llama7b_lora`` / ``llama7b_lora_checkpointing``: a LLaMA-2-7B-shaped model (initialised on the meta device,
  random bf16 weights materialised on the GPU) + LoRA, one step of 16 prompts, without and with gradient
  checkpointing: seconds and peak memory;
* ``reranker_7b_mlp`` / ``reranker_7b_grid``: a reranker step on 4 lists x 20 candidates on that model (the
  cross-encoder over image tokens, and late interaction with the grid head);
* ``efficiency_<size>`` at 1K, 100K and 1M images: AVG (a T5-base-sized model, beam 20) and the CLIP two-tower
  (a ViT-L/14-sized text tower, exact fp16 search; FAISS IVF-Flat when faiss is installed), queries per second.

stdout holds ONE JSON object and nothing else (the log goes to stderr)::

    {"device": "...", "dry_run": false, "versions": {...}, "seconds": ...,
     "checks": {"<name>": {"pass": true, "seconds": ..., "peak_memory_gb": ..., ...}}}

where a failed check has ``"pass": false`` and ``"error"``; timed checks add ``s_per_step`` or ``queries_per_s``.
Exit status: 0 when every check passed, 1 otherwise. docs/gpu.md says what to do with the output.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a fresh clone without install
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

REAL = dict(rq_dim=768, rq_books=1024, rq_batch=2048, levels=4,
            t5=dict(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12, vocab=32128), t5_batch=128, src_len=24,
            llama=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000), llama_batch=16, llama_len=32,
            clip_text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           vocab_size=49408, projection_dim=768), gallery_sizes=(1_000, 100_000, 1_000_000),
            beam=20, bench_queries=256, grid_width=1024)
TINY = dict(rq_dim=32, rq_books=16, rq_batch=64, levels=4,
            t5=dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab=384), t5_batch=16, src_len=12,
            llama=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=400), llama_batch=4, llama_len=16,
            clip_text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           vocab_size=49408, projection_dim=32), gallery_sizes=(1_000, 10_000),
            beam=8, bench_queries=32, grid_width=32)


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


class Context:
    def __init__(self, dry_run: bool, work: Path, seed: int = 0):
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
        self.sizes = TINY if dry_run else REAL
        self.work, self.seed = work, seed
        self.cache: dict = {}  # the 7B model, shared by the LoRA and reranker checks

    def autocast(self, dtype=torch.bfloat16):
        return torch.autocast(self.device.type, dtype=dtype)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self):
        return round(torch.cuda.max_memory_allocated() / 2**30, 3) if self.device.type == "cuda" else None


def timed_steps(ctx: Context, step, n: int, warmup: int = 2) -> dict:
    """``step()`` ``warmup`` times, then ``n`` timed times: seconds per step; every loss must be finite."""
    losses = []
    for _ in range(warmup):
        losses.append(float(step()))
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(n):
        losses.append(float(step()))
    ctx.sync()
    if not all(map(lambda x: x == x and abs(x) != float("inf"), losses)):
        raise RuntimeError(f"non-finite loss: {losses}")
    return {"s_per_step": round((time.perf_counter() - t0) / n, 5), "first_loss": round(losses[0], 4),
            "last_loss": round(losses[-1], 4)}


# --------------------------------------------------------------------------------------------- stages_tiny
def check_stages_tiny(ctx: Context) -> dict:
    """The stage modules themselves, one after another in this process, on the Flickr30K look-alike."""
    from accelerate.state import AcceleratorState

    import make_rehearsal_fixture as fixture

    fix = ctx.work / "fixture"
    made = fixture.main(["--out-dir", str(fix), "--n-train", "32", "--n-restval", "8", "--n-val", "8", "--n-test", "8"])
    os.environ["WANDB_MODE"] = "disabled"
    clip, t5, llama = (made[name] for name in (fixture.CLIP_HUB, fixture.T5_HUB, fixture.LLAMA_HUB))  # local folders
    data, out = fix / "flickr30k", ctx.work / "stages"
    d = {name: str(out / name) for name in ("prepare_emb", "train_rqvae", "generate_codes", "prepare_retriever_dataset",
                                            "t5", "t5_stage2", "llama", "llama_test", "rr_data", "rr_tokens", "rr",
                                            "rr_test")}
    mp = ["--mixed-precision", "bf16"]
    steps = [
        ("prepare_emb", "avg.stages.prepare_emb", ["--annotations", str(data / "dataset_flickr30k.json"), "--image-root",
         str(data / "flickr30k-images"), "--backend", "hf", "--clip-model", clip,
         "--image-grid", "4", "--num-workers", "0", "--batch-size", "16", "--out-dir", d["prepare_emb"]]),
        ("train_rqvae", "avg.stages.train_rqvae", ["--emb-dir", d["prepare_emb"], "--epochs", "2", "--batch-size", "16",
         "--codebook-size", "16", "--latent-dim", "16", "--hidden-dims", "32", "--kmeans-samples", "32",
         "--out-dir", d["train_rqvae"]]),
        ("generate_codes", "avg.stages.generate_codes", ["--rqvae-dir", d["train_rqvae"], "--emb-dir", d["prepare_emb"],
         "--out-dir", d["generate_codes"]]),
        ("prepare_retriever_dataset", "avg.stages.prepare_retriever_dataset", [
         "--annotations", str(data / "dataset_flickr30k.json"), "--image-root", str(data / "flickr30k-images"),
         "--codes-dir", d["generate_codes"], "--emb-dir", d["prepare_emb"], "--out-dir", d["prepare_retriever_dataset"]]),
        ("train_retriever_t5", "avg.stages.train_retriever_t5", ["--stage", "1", "--data-dir",
         d["prepare_retriever_dataset"], "--codes-dir", d["generate_codes"], "--model", t5, "--epochs", "1",
         "--batch-size", "16", "--query-prefix", "4", "--num-beams", "8", "--eval-train-queries", "0",
         "--sample-queries", "0", "--out-dir", d["t5"], *mp]),
        ("train_retriever_t5_stage2", "avg.stages.train_retriever_t5", ["--stage", "2", "--data-dir",
         d["prepare_retriever_dataset"], "--init-from", d["t5"] + "/best", "--epochs", "1", "--batch-size", "16",
         "--max-train-queries", "32", "--dis-beams", "4", "--num-beams", "8", "--eval-train-queries", "0",
         "--sample-queries", "0", "--out-dir", d["t5_stage2"], *mp]),
        ("finetune_retriever_llama", "avg.stages.finetune_retriever_llama", ["--data-dir", d["prepare_retriever_dataset"],
         "--codes-dir", d["generate_codes"], "--model", llama, "--epochs", "1", "--batch-size",
         "16", "--max-train-queries", "64", "--max-eval-queries", "8", "--skip-test", "--num-beams", "8",
         "--out-dir", d["llama"], *mp]),
        ("test_retriever_llama", "avg.stages.test_retriever_llama", ["--retriever-dir", d["llama"] + "/best",
         "--data-dir", d["prepare_retriever_dataset"], "--num-beams", "8", "--sample-queries", "0", "--out-dir",
         d["llama_test"]]),
        ("prepare_reranker_dataset", "avg.stages.prepare_reranker_dataset", ["--data-dir", d["prepare_retriever_dataset"],
         "--retriever-dir", d["t5_stage2"] + "/best", "--reuse-retriever-runs", "--topk", "8", "--num-beams", "8",
         "--train-candidates", "clip", "--emb-dir", d["prepare_emb"], "--train-gallery-size", "16",
         "--out-dir", d["rr_data"]]),
        ("convert_voken_to_seed", "avg.stages.convert_voken_to_seed", ["--codes-dir", d["generate_codes"], "--emb-dir",
         d["prepare_emb"], "--out-dir", d["rr_tokens"]]),
        ("finetune_reranker_llama", "avg.stages.finetune_reranker_llama", ["--data-dir", d["rr_data"], "--tokens-dir",
         d["rr_tokens"], "--model", str(fix / "seed-llama"), "--emb-dir", d["prepare_emb"], "--epochs", "1",
         "--batch-size", "8", "--late-interaction", "--query-pooling", "mean", "--embed-fusion", "learned",
         "--fit-embed-weight", "--grid-head", "4", "--train-topk", "4", "--fusion", "val", "--out-dir", d["rr"], *mp]),
        ("test_reranker_llama", "avg.stages.test_reranker_llama", ["--reranker-dir", d["rr"] + "/best", "--data-dir",
         d["rr_data"], "--out-dir", d["rr_test"]]),
    ]
    import importlib

    seconds, trained_under = {}, set()
    for name, module, argv in steps:
        if hasattr(AcceleratorState, "_reset_state"):  # each stage makes its own Accelerator, as in its own process
            AcceleratorState._reset_state(reset_partial_state=True)
        t0 = time.perf_counter()
        importlib.import_module(module).main(argv + ["--force"])
        seconds[name] = round(time.perf_counter() - t0, 2)
        if AcceleratorState._shared_state:  # a trainer: how accelerate ran it (DeepSpeed under its launch config)
            trained_under.add(str(AcceleratorState().distributed_type).split(".")[-1])
        log(f"stages_tiny: {name} ran in {seconds[name]} s")
    return {"stage_seconds": seconds, "distributed_types": sorted(trained_under)}


# --------------------------------------------------------------------------------------------- real-sized steps
def _codes(n: int, levels: int, books: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, books, (n, levels), generator=gen)


def check_rqvae(ctx: Context) -> dict:
    from avg.models.rqvae import RQVAE, RQVAEConfig

    s = ctx.sizes
    torch.manual_seed(ctx.seed)
    model = RQVAE(RQVAEConfig(input_dim=s["rq_dim"], codebook_size=s["rq_books"], num_levels=s["levels"])).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.nn.functional.normalize(torch.randn(s["rq_batch"], s["rq_dim"], device=ctx.device), dim=-1)
    t = torch.nn.functional.normalize(x + 0.1 * torch.randn_like(x), dim=-1)

    def step():
        with ctx.autocast():
            loss = model(x, text=t).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return timed_steps(ctx, step, 10)


def _t5(ctx: Context):
    from transformers import T5Config, T5ForConditionalGeneration

    s = ctx.sizes
    c = s["t5"]
    torch.manual_seed(ctx.seed)
    cfg = T5Config(vocab_size=c["vocab"] + s["levels"] * s["rq_books"], d_model=c["d_model"], d_ff=c["d_ff"],
                   d_kv=c["d_kv"], num_layers=c["num_layers"], num_decoder_layers=c["num_layers"], num_heads=c["num_heads"],
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).to(ctx.device), c["vocab"]


def _t5_batch(ctx: Context, base: int, gallery_tokens: torch.Tensor, gen: torch.Generator):
    s = ctx.sizes
    ids = torch.randint(2, base, (s["t5_batch"], s["src_len"]), generator=gen)
    rows = torch.randint(0, gallery_tokens.shape[0], (s["t5_batch"],), generator=gen)
    return ids.to(ctx.device), torch.ones_like(ids).to(ctx.device), gallery_tokens[rows].to(ctx.device)


def _gallery_tokens(ctx: Context, base: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Per-level voken token ids of ``n`` random codes (level d's tokens follow level d-1's)."""
    s = ctx.sizes
    codes = _codes(n, s["levels"], s["rq_books"], gen)
    return base + codes + torch.arange(s["levels"])[None, :] * s["rq_books"]


def _t5_step(ctx: Context, *, precision: str) -> dict:
    from avg.objectives.retrieval import RetrievalObjective
    from avg.search.code_index import CodeIndex

    gen = torch.Generator().manual_seed(ctx.seed)
    model, base = _t5(ctx)
    gallery = _gallery_tokens(ctx, base, 10_000, gen)
    index = CodeIndex.from_codes(gallery, model.config.vocab_size, device=ctx.device)
    objective = RetrievalObjective(model, loss="children", index=index).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, mask, labels = _t5_batch(ctx, base, gallery, gen)
    tf32 = precision == "fp32_tf32"
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32

    def step():
        with ctx.autocast() if precision == "bf16" else contextlib.nullcontext():
            loss, _ = objective(ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    out = timed_steps(ctx, step, 10)
    out["examples_per_s"] = round(ctx.sizes["t5_batch"] / out["s_per_step"], 1)
    return out


def check_t5_stage2(ctx: Context) -> dict:
    """Stage 2's step: mine each query's top-10 codes in a 1,000-code chunk, then L_gen + L_dis (eq. 10)."""
    from avg.objectives.retrieval import RetrievalObjective, mine_candidates
    from avg.search.code_index import CodeIndex

    gen = torch.Generator().manual_seed(ctx.seed)
    model, base = _t5(ctx)
    gallery = _gallery_tokens(ctx, base, 1_000, gen)
    index = CodeIndex.from_codes(gallery, model.config.vocab_size, device=ctx.device)
    objective = RetrievalObjective(model, loss="children", index=index, dis_weight=1.0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, mask, labels = _t5_batch(ctx, base, gallery, gen)
    voken_ids = torch.arange(base, model.config.vocab_size, device=ctx.device)

    def step():
        with ctx.autocast():
            cands, cmask, pidx, _ = mine_candidates(model, None, ids, mask, None, index, 10, labels,
                                                    voken_ids=voken_ids, normalize="children", generator=gen)
            loss, _ = objective(ids, mask, labels, candidates=cands, positive_index=pidx.to(ctx.device),
                                candidate_mask=cmask, candidate_index=index)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return timed_steps(ctx, step, 5, warmup=1)


def check_search_cuda_matches_cpu(ctx: Context) -> dict:
    """One fixed model, searched on the CPU and on ``ctx.device`` (float32, TF32 off): the same rankings."""
    from types import SimpleNamespace

    from transformers import T5Config, T5ForConditionalGeneration

    from avg.experiments.rehearsal import same_ranking
    from avg.search.beam import constrained_beam_search
    from avg.search.code_index import CodeIndex

    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    gen = torch.Generator().manual_seed(ctx.seed)
    torch.manual_seed(ctx.seed)
    cfg = T5Config(vocab_size=1000 + 4 * 64, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2,
                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(cfg).eval()
    codes = 1000 + _codes(2000, 4, 64, gen) + torch.arange(4)[None, :] * 64
    ids = torch.randint(2, 1000, (32, 12), generator=gen)
    compared, same = 0, 0
    for normalize in ("vocab", "children"):
        runs = []
        for device in (torch.device("cpu"), ctx.device):
            m = model.to(device)
            out = constrained_beam_search(m, ids.to(device), torch.ones_like(ids).to(device),
                                          CodeIndex.from_codes(codes, cfg.vocab_size, device=device), 20,
                                          decoder_start_token_id=0, eos_token_id=1 if normalize == "vocab" else None,
                                          voken_ids=torch.arange(1000, cfg.vocab_size, device=device)
                                          if normalize == "children" else None, normalize=normalize)
            runs.append([SimpleNamespace(ranked=[tuple(c) for c in seq.tolist()], scores=sc.tolist())
                         for seq, sc in zip(out.sequences.cpu(), out.scores.cpu())])
        for a, b in zip(*runs):
            if not same_ranking(a, b, 1e-4):
                raise RuntimeError(f"{normalize}: the {ctx.device.type} ranking differs from the CPU's: "
                                   f"{b.ranked[:3]} vs {a.ranked[:3]}")
            compared, same = compared + 1, same + (a.ranked == b.ranked)
    return {"queries_compared": compared, "identical": same}


def _llama7b(ctx: Context):
    """A LLaMA-2-7B-shaped model: built on the meta device, random bf16 weights materialised on the device."""
    if "llama" in ctx.cache:
        return ctx.cache["llama"]
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**ctx.sizes["llama"], max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=ctx.device).to(torch.bfloat16)
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02, generator=gen)
    # buffers made on the meta device (the rotary frequencies) are rebuilt on the device
    with torch.device(ctx.device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    ctx.cache["llama"] = model
    return model


def _lora_step(ctx: Context, checkpointing: bool) -> dict:
    from types import SimpleNamespace

    from avg.retriever import llama as L

    s = ctx.sizes
    base = _llama7b(ctx)
    vocab = SimpleNamespace(voken_ids=torch.arange(s["llama"]["vocab_size"] - 4096, s["llama"]["vocab_size"])
                            if not ctx.dry_run else torch.arange(300, 400))
    model = L.add_lora(base, vocab, r=8, alpha=16, dropout=0.05)
    if checkpointing:
        L.enable_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    gen = torch.Generator().manual_seed(ctx.seed)
    ids = torch.randint(3, s["llama"]["vocab_size"], (s["llama_batch"], s["llama_len"]), generator=gen).to(ctx.device)
    labels = ids.masked_fill(torch.arange(s["llama_len"], device=ctx.device)[None, :] < s["llama_len"] - 5, -100)
    ctx.reset_peak()

    def step():
        with ctx.autocast():
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        out = timed_steps(ctx, step, 3, warmup=1)
    finally:
        if checkpointing:
            model.gradient_checkpointing_disable()
        ctx.cache["llama"] = model.unload()  # the base model back, without LoRA layers, for the next check
    return {**out, "trainable_weights": trainable}


def _reranker_step(ctx: Context, grid: bool) -> dict:
    from avg.reranker.model import Reranker

    s = ctx.sizes
    lm = _llama7b(ctx)
    lists, k, feat, cells = 4, 20, 768 if not ctx.dry_run else 32, 16
    torch.manual_seed(ctx.seed)
    rr = Reranker(lm, feature_dim=feat, embed_fusion="learned", fusion="none", candidate_tokens=not grid,
                  grid_slots=8 if grid else 0, grid_width=s["grid_width"] if grid else 0, grid_cells=cells if grid else 0,
                  query_pooling="mean" if grid else "last").to(ctx.device)
    for p in rr.lm.parameters():
        p.requires_grad_(False)
    rr.train()
    opt = torch.optim.AdamW([p for p in rr.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(ctx.seed)
    vocab = s["llama"]["vocab_size"]
    valid = torch.ones(lists, k, dtype=torch.bool)
    batch = {"prompt_ids": torch.randint(3, vocab, (lists, 24), generator=gen),
             "prompt_mask": torch.ones(lists, 24, dtype=torch.long), "valid": valid,
             "list_index": torch.arange(lists).repeat_interleave(k),
             "query_features": torch.randn(lists, feat, generator=gen), "candidate_features": torch.randn(lists, k, feat, generator=gen),
             "cosine": torch.rand(lists, k, generator=gen) * 2 - 1}
    if grid:
        batch["candidate_grid"] = torch.randn(lists, k, cells, s["grid_width"], generator=gen)
    else:
        batch["candidate_ids"] = torch.randint(3, vocab, (lists * k, 6), generator=gen)
    batch = {key: v.to(ctx.device) for key, v in batch.items()}
    labels = torch.zeros(lists, dtype=torch.long, device=ctx.device)
    ctx.reset_peak()

    def step():
        with ctx.autocast():
            base, _ = rr(**batch)
        loss = torch.nn.functional.cross_entropy(base.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    out = timed_steps(ctx, step, 3, warmup=1)
    out["lists_per_s"] = round(lists / out["s_per_step"], 2)
    return out


# --------------------------------------------------------------------------------------------- efficiency
def check_efficiency(ctx: Context, size: int) -> dict:
    """Queries per second at one gallery size, text in -> ids out: AVG (T5-base-sized, beam 20, children score)
    and the CLIP two-tower (ViT-L-sized text tower; exact fp16 search; FAISS IVF-Flat when installed)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from avg.search.beam import constrained_beam_search
    from avg.search.code_index import CodeIndex

    s = ctx.sizes
    gen = torch.Generator().manual_seed(ctx.seed)
    model, base = _t5(ctx)
    model = model.to(torch.bfloat16 if ctx.device.type == "cuda" else torch.float32).eval()
    gallery = _gallery_tokens(ctx, base, size, gen)
    t0 = time.perf_counter()
    index = CodeIndex.from_codes(gallery, model.config.vocab_size, device=ctx.device)
    out = {"index_build_s": round(time.perf_counter() - t0, 2)}
    voken_ids = torch.arange(base, model.config.vocab_size, device=ctx.device)
    n, batch = s["bench_queries"], 32
    ids = torch.randint(2, base, (n, s["src_len"]), generator=gen).to(ctx.device)

    def rate(fn) -> float:
        fn(0)
        ctx.sync()
        t = time.perf_counter()
        for lo in range(0, n, batch):
            fn(lo)
        ctx.sync()
        return round(n / (time.perf_counter() - t), 1)

    with torch.no_grad():
        out["avg_queries_per_s"] = rate(lambda lo: constrained_beam_search(
            model, ids[lo:lo + batch], torch.ones_like(ids[lo:lo + batch]), index, s["beam"], decoder_start_token_id=0,
            voken_ids=voken_ids, normalize="children"))
        c = s["clip_text"]
        text = CLIPTextModelWithProjection(CLIPTextConfig(**c, max_position_embeddings=77)).to(ctx.device).eval()
        feats = torch.nn.functional.normalize(torch.randn(size, c["projection_dim"], generator=gen), dim=-1)
        feats = feats.to(ctx.device, torch.float16 if ctx.device.type == "cuda" else torch.float32)
        tokens = torch.randint(1, c["vocab_size"] - 1, (n, 16), generator=gen).to(ctx.device)

        def clip_search(lo):
            with ctx.autocast(torch.float16) if ctx.device.type == "cuda" else contextlib.nullcontext():
                q = text(input_ids=tokens[lo:lo + batch]).text_embeds
            q = torch.nn.functional.normalize(q.float(), dim=-1).to(feats.dtype)
            return (q @ feats.T).topk(s["beam"], dim=-1).indices
        out["clip_exact_queries_per_s"] = rate(clip_search)
        try:
            import faiss

            from avg.experiments.ann import build_ann

            cpu_feats = feats.float().cpu().numpy()
            ann = build_ann(cpu_feats, "ivf_flat")
            ann.set_knob(16)

            def ann_search(lo):
                with ctx.autocast(torch.float16) if ctx.device.type == "cuda" else contextlib.nullcontext():
                    q = text(input_ids=tokens[lo:lo + batch]).text_embeds
                return ann.search(torch.nn.functional.normalize(q.float(), dim=-1).cpu().numpy(), s["beam"])
            out["clip_ivf_flat_queries_per_s"] = rate(ann_search)
            out["faiss"] = faiss.__version__
        except ImportError:
            out["faiss"] = None  # not installed: the exact search stands alone
    out["queries"] = n
    return out


# --------------------------------------------------------------------------------------------- driver
def checks(ctx: Context) -> list:
    s = ctx.sizes
    items = [("stages_tiny", check_stages_tiny), ("rqvae_real", check_rqvae),
             ("t5_stage1_real_bf16", lambda c: _t5_step(c, precision="bf16")),
             ("t5_stage1_real_fp32_tf32", lambda c: _t5_step(c, precision="fp32_tf32")),
             ("t5_stage2_real", check_t5_stage2), ("search_cuda_matches_cpu", check_search_cuda_matches_cpu),
             ("llama7b_lora", lambda c: _lora_step(c, False)), ("llama7b_lora_checkpointing", lambda c: _lora_step(c, True)),
             ("reranker_7b_mlp", lambda c: _reranker_step(c, False)), ("reranker_7b_grid", lambda c: _reranker_step(c, True))]
    items += [(f"efficiency_{size // 1000}k" if size < 10**6 else f"efficiency_{size // 10**6}m",
               lambda c, size=size: check_efficiency(c, size)) for size in s["gallery_sizes"]]
    return items


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for dist in ("torch", "transformers", "accelerate", "peft", "open_clip_torch", "faiss-cpu", "faiss-gpu", "deepspeed"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same checks on the CPU at tiny sizes")
    p.add_argument("--only", default="", help="comma-separated check names (default: all)")
    p.add_argument("--out", default=None, help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    ctx_work = tempfile.TemporaryDirectory(prefix="gpu_check_")
    ctx = Context(args.dry_run, Path(ctx_work.name))
    if not args.dry_run and ctx.device.type != "cuda":
        log("torch sees no CUDA device: checks run on the CPU at real sizes (use --dry-run for the tiny sizes)")
    wanted = {x for x in args.only.split(",") if x}
    device = torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    summary = {"device": device, "dry_run": args.dry_run, "versions": versions(), "checks": {}}
    t_all = time.perf_counter()
    # stdout holds the summary alone: what the libraries print there (DeepSpeed does) goes to stderr
    sys.stdout.flush()
    stdout_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        run_all(ctx, wanted, summary)
    finally:
        sys.stdout.flush()
        os.dup2(stdout_fd, 1)
        os.close(stdout_fd)
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    text = json.dumps(summary)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text, flush=True)
    ctx_work.cleanup()
    return 0 if all(c["pass"] for c in summary["checks"].values()) else 1


def run_all(ctx: Context, wanted: set, summary: dict) -> None:
    for name, fn in checks(ctx):
        if wanted and name not in wanted:
            continue
        log(f"{name} ...")
        ctx.reset_peak()
        t0 = time.perf_counter()
        try:
            result = {"pass": True, **(fn(ctx) or {})}
        except Exception as e:  # a failure is a result: the next check still runs
            result = {"pass": False, "error": f"{type(e).__name__}: {e}"}
            log(f"{name} FAILED:\n{traceback.format_exc()}")
        result["seconds"] = round(time.perf_counter() - t0, 2)
        result["peak_memory_gb"] = ctx.peak_gb()
        summary["checks"][name] = result
        log(f"{name}: {'pass' if result['pass'] else 'FAIL'} in {result['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
