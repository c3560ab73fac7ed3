"""Build the demo's small LLaMA: a randomly initialised LlamaForCausalLM + a tokenizer trained on
the demo TRAIN captions.

SmolLM2-135M costs ~5 s per LoRA step on 2 CPU cores, too slow for a demo that must finish in
minutes, so the demo's LLaMA-family stages (the LLaMA retriever and the reranker) can start from
this seeded random model instead. The tokenizer is a byte-pair model over Metaspace words
(``tokenizers``), trained on the training captions only, with LLaMA's conventions: ``<s>``
prepended, ``</s>`` as EOS, a ``<pad>`` token, left padding supported. Both are written with
save_pretrained, so the code loads the folder exactly as it loads a hub LLaMA:

    python tools/make_demo_llama.py --annotations data/demo/dataset_demo.json   # -> data/demo/llama-demo

Cached: an existing complete folder is kept unless --force.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

from avg.data.demo import train_captions
from avg.core.cli import run_main

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3 (LLaMA: unk/bos/eos = 0/1/2)
INFO_FILE = "demo_llama.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """A LLaMA-style fast tokenizer (BOS prepended, no EOS appended to prompts) trained on `texts`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from avg.data.demo import train_caption_bpe

    tok = train_caption_bpe(texts, vocab_size, SPECIAL)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left", model_max_length=512)


def build_model(tokenizer, *, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 512, max_positions: int = 256, seed: int = 0):
    """A randomly initialised LlamaForCausalLM (tied embeddings), seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_demo_llama(texts: list[str], out_dir: str | Path, *, vocab_size: int = 2000, hidden: int = 128,
                    layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 512,
                    seed: int = 0) -> Path:
    from avg.core.io import atomic_dir, write_json

    tokenizer = train_tokenizer(texts, vocab_size)
    model = build_model(tokenizer, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                        intermediate=intermediate, seed=seed)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json({"train_captions": len(texts), "vocab_size": len(tokenizer), "hidden": hidden, "layers": layers,
                    "heads": heads, "kv_heads": kv_heads, "intermediate": intermediate, "seed": seed,
                    "parameters": sum(p.numel() for p in model.parameters())}, tmp / INFO_FILE)
    return out_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--annotations", required=True, help="Karpathy json of the demo data (TRAIN captions are used)")
    p.add_argument("--out-dir", default=None, help="output folder (default: <folder of --annotations>/llama-demo)")
    p.add_argument("--vocab-size", type=int, default=2000, help="tokenizer vocabulary size")
    p.add_argument("--hidden", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    p.add_argument("--intermediate", type=int, default=512, help="feed-forward width")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--force", action="store_true", help="rebuild even when out-dir already holds a model")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = Path(args.out_dir) if args.out_dir else Path(args.annotations).parent / "llama-demo"
    if not args.force and (out / INFO_FILE).is_file() and (out / "config.json").is_file():
        print(f"{out}: demo LLaMA already built (use --force to rebuild)", file=sys.stderr)
        return out
    texts = train_captions(args.annotations)
    if not texts:
        from avg.core.io import InputError
        raise InputError(f"{args.annotations}: no training captions")
    make_demo_llama(texts, out, vocab_size=args.vocab_size, hidden=args.hidden, layers=args.layers, heads=args.heads,
                    kv_heads=args.kv_heads, intermediate=args.intermediate, seed=args.seed)
    info = json.loads((out / INFO_FILE).read_text())
    print(f"{out}: demo LLaMA with {info['parameters']:,} parameters, vocabulary {info['vocab_size']} "
          f"(tokenizer trained on {info['train_captions']} train captions)", file=sys.stderr)
    return out


if __name__ == "__main__":
    run_main(main)
