"""Build the demo's small T5: a T5Config model + a tokenizer trained on the demo TRAIN captions.

No T5 weights can be downloaded in the demo environment, so the demo retriever starts from a
randomly initialised small T5 (T5-v1.0 layout: tied embeddings, ReLU FFN) whose tokenizer is a
byte-pair model over Metaspace words ('▁' marks a word start, as in T5's SentencePiece) trained
with `tokenizers` on the training captions only. (BPE rather than T5's Unigram: the `tokenizers`
Unigram trainer returns a near character-level vocabulary on small caption sets, which would
triple the sequence length.) Both are written with save_pretrained, so the training code loads the
folder exactly as it loads ``t5-base``:

    python tools/make_demo_t5.py --annotations data/demo/dataset_demo.json   # -> data/demo/t5-demo

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

SPECIAL = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """A T5-style (Metaspace words, '</s>' appended, pad/eos/unk = 0/1/2) fast tokenizer trained on `texts`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from avg.data.demo import train_caption_bpe

    tok = train_caption_bpe(texts, vocab_size, SPECIAL)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def build_model(vocab_size: int, *, d_model: int = 128, num_layers: int = 2, num_heads: int = 4,
                d_ff: int = 512, dropout: float = 0.1, seed: int = 0):
    """A randomly initialised T5ForConditionalGeneration of the given size (seeded)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                      num_layers=num_layers, num_decoder_layers=num_layers, num_heads=num_heads,
                      dropout_rate=dropout, feed_forward_proj="relu", tie_word_embeddings=True,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


def make_demo_t5(texts: list[str], out_dir: str | Path, *, vocab_size: int = 2000, d_model: int = 128,
                 num_layers: int = 2, num_heads: int = 4, d_ff: int = 512, seed: int = 0) -> Path:
    from avg.core.io import atomic_dir, write_json

    tokenizer = train_tokenizer(texts, vocab_size)
    model = build_model(len(tokenizer), d_model=d_model, num_layers=num_layers, num_heads=num_heads, d_ff=d_ff, seed=seed)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json({"train_captions": len(texts), "vocab_size": len(tokenizer), "d_model": d_model,
                    "num_layers": num_layers, "num_heads": num_heads, "d_ff": d_ff, "seed": seed,
                    "parameters": sum(p.numel() for p in model.parameters())}, tmp / "demo_t5.json")
    return out_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--annotations", required=True, help="Karpathy json of the demo data (TRAIN captions are used)")
    p.add_argument("--out-dir", default=None, help="output folder (default: <folder of --annotations>/t5-demo)")
    p.add_argument("--vocab-size", type=int, default=2000, help="tokenizer vocabulary size")
    p.add_argument("--d-model", type=int, default=128, help="model width")
    p.add_argument("--num-layers", type=int, default=2, help="layers in the encoder and in the decoder")
    p.add_argument("--num-heads", type=int, default=4, help="attention heads")
    p.add_argument("--d-ff", type=int, default=512, help="feed-forward width")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--force", action="store_true", help="rebuild even when out-dir already holds a model")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = Path(args.out_dir) if args.out_dir else Path(args.annotations).parent / "t5-demo"
    if not args.force and (out / "demo_t5.json").is_file() and (out / "config.json").is_file():
        print(f"{out}: demo T5 already built (use --force to rebuild)", file=sys.stderr)
        return out
    texts = train_captions(args.annotations)
    if not texts:
        from avg.core.io import InputError
        raise InputError(f"{args.annotations}: no training captions")
    make_demo_t5(texts, out, vocab_size=args.vocab_size, d_model=args.d_model, num_layers=args.num_layers,
                 num_heads=args.num_heads, d_ff=args.d_ff, seed=args.seed)
    info = json.loads((out / "demo_t5.json").read_text())
    print(f"{out}: demo T5 with {info['parameters']:,} parameters, vocabulary {info['vocab_size']} "
          f"(tokenizer trained on {info['train_captions']} train captions)", file=sys.stderr)
    return out


if __name__ == "__main__":
    run_main(main)
