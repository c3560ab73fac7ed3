"""Time and memory of the real run, by arithmetic: parameters, tokens and FLOPs per stage for Flickr30K and COCO, and
the hours that makes on 1 and 4 A100- or H100-class GPUs at a stated utilisation -- estimates until scripts/gpu_check.sh
has measured the step times on a GPU.

    python tools/estimate_real_run.py              # the markdown tables of docs/real_data.md, "Time and memory"
    python tools/estimate_real_run.py --measure    # and a T5-base step and a LLaMA-7B layer timed on this CPU

Parameters are counted from the real configs' shapes (models built on the meta device: nothing is downloaded).
FLOPs: 2 per parameter and token forward, 6 in training (4 under LoRA: no gradient for frozen weights); attention's
quadratic term is left out (sequences of 20-180 tokens). --measure times the real-shaped T5-base training step and
one LLaMA-7B decoder layer (forward and backward, inputs' gradients only) on the CPU and prints the FLOP rate they
reach, the check that the FLOP counts above describe the work.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# Karpathy splits: images (train incl. restval / val / test), 5 captions an image; caption words (the usual means)
DATASETS = {"Flickr30K": dict(train=29_783, val=1_000, test=1_000, words=12.3),
            "COCO": dict(train=113_287, val=5_000, test=5_000, words=10.5)}
SPM_TOKENS_PER_WORD = 1.3     # SentencePiece (T5, LLaMA) on English captions
GPUS = {"A100": 312e12, "H100": 989e12}   # dense bf16 peak FLOP/s (SXM)
MFU = {"clip": 0.40, "t5": 0.25, "llama": 0.40}   # assumed utilisation: small T5 batches use a GPU less well
EPOCHS = dict(t5=20, stage2=3, llama=3, reranker=1)   # configs/flickr30k.sh and coco.sh
RERANK_LISTS, RERANK_TOPK, BEAM = 20_000, 20, 20


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


#: t5-base's shapes and special ids (its config.json): the ids matter, T5 shifts the labels right by its decoder start id
T5_BASE = dict(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12, pad_token_id=0, eos_token_id=1,
               decoder_start_token_id=0)
#: one decoder layer of LLaMA-2-7B
LLAMA_7B_LAYER = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)


def t5_counts(t5) -> dict:
    """Parameters of a T5 by part; the shared embedding (tied to the head) counted once, as the head."""
    emb = t5.shared.weight.numel()
    return {"t5": count(t5), "t5_encoder": count(t5.encoder) - emb, "t5_decoder": count(t5.decoder) - emb, "t5_head": emb}


def models() -> dict:
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    with torch.device("meta"):
        clip = CLIPModel(CLIPConfig(
            text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=336, patch_size=14), projection_dim=768))
        t5 = T5ForConditionalGeneration(T5Config(vocab_size=32128 + 4 * 1024, **T5_BASE))
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=32000 + 4 * 1024, hidden_size=4096, intermediate_size=11008,
                                             num_hidden_layers=32, num_attention_heads=32, tie_word_embeddings=False))
    return {"clip_vision": count(clip.vision_model) + count(clip.visual_projection),
            "clip_text": count(clip.text_model) + count(clip.text_projection), **t5_counts(t5),
            "llama": count(llama), "llama_body": count(llama) - 2 * llama.lm_head.weight.numel()}


def stages(p: dict, d: dict) -> list[dict]:
    """Per stage of run_all: what runs, FLOPs, and the GPU-memory arithmetic (bytes)."""
    captions = 5 * d["train"]
    cap = d["words"] * SPM_TOKENS_PER_WORD
    enc, dec = cap + 1, 5          # T5: caption + EOS; 4 vokens + EOS
    prompt = cap + 6 + 5           # LLaMA: "Caption: {query}\nImage:" + 4 vokens + EOS
    images = d["train"] + d["val"] + d["test"]
    t5_step = 6 * (p["t5_encoder"] * enc + (p["t5_decoder"] + p["t5_head"]) * dec)
    t5_search = 2 * p["t5_encoder"] * enc + 2 * (p["t5_decoder"] + p["t5_head"]) * dec * 10   # 10 beams
    rr_tokens = prompt - 5 + RERANK_TOPK * 8      # the prompt once (shared prefix), 8 image tokens per candidate
    gb = 2**30
    return [
        dict(stage="prepare_emb (CLIP ViT-L/14-336)", params=p["clip_vision"] + p["clip_text"],
             tokens=f"{images:,} images x 577 + {5 * images:,} captions x ~{cap + 2:.0f}",
             flops=2 * p["clip_vision"] * 577 * images + 2 * p["clip_text"] * (cap + 2) * 5 * images, kind="clip",
             memory=(p["clip_vision"] + p["clip_text"]) * 2 + 256 * 577 * 1024 * 2 * 30),
        dict(stage=f"train_retriever_t5 ({EPOCHS['t5']} epochs, batch 128)", params=p["t5"],
             tokens=f"{captions:,} captions x {EPOCHS['t5']} x ({enc:.0f} + {dec})", flops=t5_step * captions * EPOCHS["t5"],
             kind="t5", memory=p["t5"] * 16 + 128 * (enc + dec) * 768 * 2 * 12 * 24),
        dict(stage=f"train_retriever_t5_stage2 ({EPOCHS['stage2']} epochs, 10 candidates)", params=p["t5"],
             tokens=f"{captions:,} x {EPOCHS['stage2']}: search + 10 candidates", kind="t5",
             flops=(t5_search + t5_step + 6 * (p["t5_decoder"] + p["t5_head"]) * dec * 10) * captions * EPOCHS["stage2"],
             memory=p["t5"] * 16 + 128 * 11 * (enc + dec) * 768 * 2 * 12 * 24),
        dict(stage=f"finetune_retriever_llama (LoRA, {EPOCHS['llama']} epochs, batch 16)", params=p["llama"],
             tokens=f"{captions:,} x {EPOCHS['llama']} x {prompt:.0f}", kind="llama",
             flops=4 * p["llama_body"] * prompt * captions * EPOCHS["llama"],
             memory=p["llama"] * 2 + 16 * prompt * 32 * 4096 * 2 * 34),
        dict(stage=f"test_retriever_llama (beam {BEAM})", params=p["llama"],
             tokens=f"{5 * d['test']:,} queries x ({prompt - 5:.0f} + {BEAM} x 5)", kind="llama",
             flops=2 * p["llama_body"] * (prompt - 5 + BEAM * 5) * 5 * d["test"], memory=p["llama"] * 2 + 4 * gb),
        dict(stage=f"finetune_reranker_llama (LoRA, {RERANK_LISTS:,} lists x {RERANK_TOPK})", params=p["llama"],
             tokens=f"{RERANK_LISTS:,} lists x {rr_tokens:.0f}", kind="llama",
             flops=4 * p["llama_body"] * rr_tokens * RERANK_LISTS * EPOCHS["reranker"],
             memory=p["llama"] * 2 + 4 * rr_tokens * 32 * 4096 * 2 * 34),
        dict(stage="test_reranker_llama", params=p["llama"], tokens=f"{5 * d['test']:,} lists x {rr_tokens:.0f}",
             kind="llama", flops=2 * p["llama_body"] * rr_tokens * 5 * d["test"], memory=p["llama"] * 2 + 4 * gb),
    ]


def hours(flops: float, kind: str, gpu: str, n: int) -> float:
    return flops / (GPUS[gpu] * MFU[kind] * n) / 3600


def table(name: str, rows: list[dict]) -> list[str]:
    out = [f"**{name}** (estimates: FLOPs / (peak bf16 x utilisation); utilisation assumed {MFU['clip']:.0%} for CLIP "
           f"and LLaMA, {MFU['t5']:.0%} for T5-base)", "",
           "| stage | parameters | tokens | FLOPs | A100 x1 | A100 x4 | H100 x1 | H100 x4 | GPU memory (one process) |",
           "|---|---|---|---|---|---|---|---|---|"]
    total = {k: 0.0 for k in ("A100x1", "A100x4", "H100x1", "H100x4")}
    for r in rows:
        cells = []
        for gpu in ("A100", "H100"):
            for n in (1, 4):
                h = hours(r["flops"], r["kind"], gpu, n)
                total[f"{gpu}x{n}"] += h
                cells.append("< 1 min" if h * 60 < 1 else f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h")
        out.append(f"| {r['stage']} | {r['params'] / 1e6:,.0f}M | {r['tokens']} | {r['flops']:.2e} | " + " | ".join(cells)
                   + f" | {r['memory'] / 2**30:.0f} GB |")
    out.append("| **all stages** | | | | " + " | ".join(f"{v:.1f} h" for v in total.values()) + " | |")
    return out


def measure(*, t5_shape: dict = T5_BASE, vokens: int = 4096, llama_layer: dict = LLAMA_7B_LAYER, batch: int = 32,
            prompts: int = 16, repeats: int = 3) -> list[str]:
    """The real-shaped T5-base training step and one LLaMA-7B decoder layer (forward + backward, frozen) on this
    machine's CPU: seconds and the FLOP rate they reach (smaller shapes only for the tests)."""
    from transformers import LlamaConfig, T5Config, T5ForConditionalGeneration
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    lines = ["", f"Measured on this CPU ({torch.get_num_threads()} threads, float32):", ""]
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32128 + vokens, **t5_shape))
    p = t5_counts(t5)
    enc, dec = 17, 5
    ids, labels = torch.randint(2, 32000, (batch, enc)), torch.randint(32128, 32128 + vokens, (batch, dec))
    opt = torch.optim.AdamW(t5.parameters(), lr=1e-4)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        t5(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    flops = 6 * (p["t5_encoder"] * enc + (p["t5_decoder"] + p["t5_head"]) * dec) * batch
    s = min(times[1:])
    lines.append(f"- T5 training step ({p['t5'] / 1e6:.0f}M parameters), batch {batch} x ({enc} + {dec}) tokens: {s:.2f} s = "
                 f"{flops / s / 1e9:.0f} GFLOP/s for {flops:.2e} FLOPs")
    cfg = LlamaConfig(**llama_layer)
    cfg._attn_implementation = "sdpa"  # what LlamaForCausalLM picks; a lone layer is given none
    layer = LlamaDecoderLayer(cfg, layer_idx=0).requires_grad_(False)
    rope = LlamaRotaryEmbedding(config=cfg)
    tokens = prompts * 32
    x = torch.randn(prompts, 32, cfg.hidden_size, requires_grad=True)
    pos = torch.arange(32)[None].expand(prompts, -1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = layer(x, position_embeddings=rope(x, pos), position_ids=pos)
        (out[0] if isinstance(out, tuple) else out).float().pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
    layer_params = sum(q.numel() for q in layer.parameters())
    s = min(times[1:])
    flops = 4 * layer_params * tokens
    lines.append(f"- one LLaMA decoder layer ({layer_params / 1e6:.0f}M parameters), forward + backward through it (LoRA's "
                 f"cost), {tokens} tokens: {s:.2f} s = {flops / s / 1e9:.0f} GFLOP/s; x 32 layers: {32 * s:.0f} s a step of "
                 f"{prompts} prompts on this CPU")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", action="store_true", help="also time a T5-base step and a LLaMA-7B layer on this CPU")
    args = ap.parse_args(argv)
    p = models()
    print(f"Parameters: CLIP ViT-L/14-336 {(p['clip_vision'] + p['clip_text']) / 1e6:.0f}M (vision "
          f"{p['clip_vision'] / 1e6:.0f}M), T5-base + 4 x 1,024 vokens {p['t5'] / 1e6:.0f}M, LLaMA-2-7B + vokens "
          f"{p['llama'] / 1e9:.2f}B.\n")
    for name, d in DATASETS.items():
        print("\n".join(table(name, stages(p, d))) + "\n")
    if args.measure:
        print("\n".join(measure()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
