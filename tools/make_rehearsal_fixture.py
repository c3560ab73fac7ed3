"""Build the rehearsal fixture: Flickr30K and COCO look-alikes and tiny random stand-ins of every real model.

The real run (``DATASET=flickr30k bash scripts/run_all.sh`` with HF CLIP ViT-L/14-336, ``t5-base`` and its
SentencePiece tokenizer, LLaMA-2 + LoRA, SEED-LLaMA) cannot run where this project is built: no weights or
data can be downloaded. ``scripts/rehearse.sh`` runs it on the CPU with what this tool writes instead --
files of the same types, layouts and code paths as the real ones, only tiny and random:

    <out>/flickr30k/dataset_flickr30k.json + flickr30k-images/*.jpg   Karpathy fields (sentids, imgid, sentences
                                                                       with tokens/raw/imgid/sentid, split)
    <out>/coco/dataset_coco.json + train2014/ + val2014/               filepath, cocoid, a restval split, images
                                                                       with 6-7 captions, a grayscale JPEG
    <out>/hf/hub/models--openai--clip-vit-large-patch14-336/       a hub cache (HF_HOME=<out>/hf) holding the real
    <out>/hf/hub/models--t5-base/                                   configs' hub names: CLIPModel + CLIPProcessor
    <out>/hf/hub/models--meta-llama--Llama-2-7b-hf/                 (the real CLIP BPE), T5 with a SentencePiece
                                                                    model (spiece.model; vocab padded to a multiple
                                                                    of 128 as t5-base's 32,128 rows for 32,100
                                                                    tokens), LLaMA with untied embeddings, fp16
                                                                    weights, a byte-fallback SentencePiece
                                                                    tokenizer without a pad token
    <out>/seed-llama/                                               SEED-LLaMA-like: the LLaMA tokenizer + <img>,
                                                                    </img>, <img_00000> ... <img_08191>

Captions describe rendered scenes (avg.data.demo), Flickr-style ("A small red star in the centre .") with a
few real-world oddities: a caption longer than CLIP's 77 tokens, non-ASCII words. Every file is made offline
from the seed; the fixture is cached (``fixture.json``, written last) and rebuilt with --force.

    python tools/make_rehearsal_fixture.py --out-dir data/rehearsal
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a fresh clone without install

from avg.core.cli import run_main  # noqa: E402
from avg.core.io import atomic_dir, read_json, write_json  # noqa: E402

FIXTURE_VERSION = 1
MARKER = "fixture.json"
CLIP_HUB = "openai/clip-vit-large-patch14-336"
T5_HUB = "t5-base"
LLAMA_HUB = "meta-llama/Llama-2-7b-hf"
SEED_DIR = "seed-llama"
SEED_IMAGE_TOKENS = 8192
LONG_CAPTION_WORDS = 90  # above CLIP's 77-token context
HF_CLIP_NAMES = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


# ------------------------------------------------------------------------------------------- datasets
def _captions(scene, rng: random.Random, n: int) -> list[str]:
    from avg.data.demo import make_captions

    caps = make_captions(scene, rng, n=min(n, 5))
    while len(caps) < n:  # COCO has images with 6-7 captions
        caps.append(make_captions(scene, rng, n=1)[0] + " again")
    return [c[0].upper() + c[1:] + " ." for c in caps]  # Flickr/COCO style: capitalised, " ." at the end


def _image(scene, rng: random.Random, size: tuple[int, int], gray: bool = False):
    from avg.data.demo import render_scene

    img = render_scene(scene, max(size), rng).resize(size)
    return img.convert("L") if gray else img


def _jpeg(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=90)


def _record(img_id: int, sent_id: int, filename: str, split: str, captions: list[str], **extra) -> dict:
    from avg.data.karpathy import tokenize_caption

    sents = [{"tokens": tokenize_caption(c), "raw": c, "imgid": img_id, "sentid": sent_id + k} for k, c in enumerate(captions)]
    return {**extra, "sentids": [s["sentid"] for s in sents], "filename": filename, "imgid": img_id, "split": split,
            "sentences": sents}


def _oddities(images: list[dict], rng: random.Random) -> None:
    """A caption longer than CLIP's context and non-ASCII words, as real caption files have."""
    from avg.data.karpathy import tokenize_caption

    train = [im for im in images if im["split"] in ("train", "restval")]
    long = train[0]["sentences"][0]
    words = [rng.choice(("very", "really", "quite")) for _ in range(LONG_CAPTION_WORDS)]
    long["raw"] = " ".join([long["raw"].rstrip(" ."), "that is", *words, "bright"]) + " ."
    odd = train[1]["sentences"][1]
    odd["raw"] = odd["raw"].rstrip(" .") + " near a café sign, naïve style ."
    for s in (long, odd):
        s["tokens"] = tokenize_caption(s["raw"])


def make_flickr30k(out: Path, *, n_train: int, n_val: int, n_test: int, seed: int) -> Path:
    """``dataset_flickr30k.json`` + ``flickr30k-images/<number>.jpg`` (Flickr's numeric names, 4:3 pictures)."""
    from avg.data.demo import sample_scene

    images, sent_id = [], 0
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    with atomic_dir(out / "flickr30k-images") as img_dir:
        for i, split in enumerate(splits):
            rng = random.Random(f"avg-rehearsal/flickr30k/{seed}/{i}")
            scene = sample_scene(rng)
            filename = f"{1000092795 + 7919 * i}.jpg"
            _jpeg(_image(scene, rng, (96, 72) if i % 3 else (72, 96)), img_dir / filename)
            images.append(_record(i, sent_id, filename, split, _captions(scene, rng, 5)))
            sent_id += 5
    _oddities(images, random.Random(seed))
    path = out / "dataset_flickr30k.json"
    write_json({"images": images, "dataset": "flickr30k"}, path, indent=None)
    return path


def make_coco(out: Path, *, n_train: int, n_restval: int, n_val: int, n_test: int, seed: int) -> Path:
    """``dataset_coco.json`` with ``filepath`` train2014/val2014, ``cocoid``, a ``restval`` split (from
    val2014), images with 6 and 7 captions and one grayscale JPEG, as in the real file."""
    from avg.data.demo import sample_scene

    images, sent_id = [], 0
    splits = ["train"] * n_train + ["restval"] * n_restval + ["val"] * n_val + ["test"] * n_test
    with contextlib.ExitStack() as stack:
        dirs = {folder: stack.enter_context(atomic_dir(out / folder)) for folder in ("train2014", "val2014")}
        for i, split in enumerate(splits):
            rng = random.Random(f"avg-rehearsal/coco/{seed}/{i}")
            scene = sample_scene(rng)
            folder = "train2014" if split == "train" else "val2014"
            cocoid = 9 + 37 * i
            filename = f"COCO_{folder}_{cocoid:012d}.jpg"
            n_caps = 7 if i == 1 else 6 if i == 2 else 5
            _jpeg(_image(scene, rng, (96, 72), gray=(i == 3)), dirs[folder] / filename)
            images.append(_record(i, sent_id, filename, split, _captions(scene, rng, n_caps), filepath=folder,
                                  cocoid=cocoid))
            sent_id += n_caps
    _oddities(images, random.Random(seed + 1))
    path = out / "dataset_coco.json"
    write_json({"images": images, "dataset": "coco"}, path, indent=None)
    return path


# ------------------------------------------------------------------------------------------- tokenizers
def _train_spm(texts: list[str], **options) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, character_coverage=1.0,
                                   num_threads=1, minloglevel=2, hard_vocab_limit=False, **options)
    return model.getvalue()


def t5_spiece(texts: list[str], vocab_size: int = 300) -> bytes:
    """T5's SentencePiece conventions: a unigram model, pad/eos/unk = 0/1/2, no BOS."""
    return _train_spm(texts, vocab_size=vocab_size, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)


def llama_spiece(texts: list[str], vocab_size: int = 400) -> bytes:
    """LLaMA's: a BPE model with byte fallback and split digits, unk/bos/eos = 0/1/2, no pad piece."""
    return _train_spm(texts, vocab_size=vocab_size, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                      byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                      remove_extra_whitespaces=False, add_dummy_prefix=True)


def _load_tokenizer(folder: Path, config: dict):
    """Write ``config`` as tokenizer_config.json and load the folder the way a hub download is loaded
    (transformers converts the SentencePiece model)."""
    from transformers import AutoTokenizer

    write_json(config, folder / "tokenizer_config.json")
    return AutoTokenizer.from_pretrained(str(folder))


# ------------------------------------------------------------------------------------------- models
def make_clip(folder: Path, *, seed: int) -> None:
    """A tiny CLIPModel (patch 14 like ViT-L/14; 56 px = a 4 x 4 patch grid) in the hub repo's older layout:
    ``pytorch_model.bin`` (loaded with torch's weights_only unpickler), ``preprocessor_config.json``, and the
    real CLIP BPE tokenizer (from open_clip's bundled vocabulary)."""
    import torch
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77),
        vision_config=dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=32)
    model = CLIPModel(cfg)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    bpe = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    # open_clip names the ends <start_of_text>/<end_of_text>; the hub's CLIP tokenizer <|startoftext|>/<|endoftext|>
    vocab = {HF_CLIP_NAMES.get(k, k): v for k, v in bpe.encoder.items()}
    CLIPTokenizer(vocab=vocab, merges=merges, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                  pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=77).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(folder)


def make_t5(folder: Path, texts: list[str], *, seed: int) -> None:
    """t5-base's layout at a tiny size: spiece.model (+ tokenizer.json), 100 <extra_id_*> tokens, the
    embedding padded to a multiple of 128 rows (t5-base: 32,128 rows for 32,100 tokens), tied, ReLU FFN."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    (folder / "spiece.model").write_bytes(t5_spiece(texts))
    tok = _load_tokenizer(folder, {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": 512})
    tok.save_pretrained(folder)
    rows = -(-len(tok) // 128) * 128
    cfg = T5Config(vocab_size=rows, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=32, dropout_rate=0.1, feed_forward_proj="relu",
                   tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(cfg).save_pretrained(folder)


def _llama(folder: Path, tok, *, seed: int) -> None:
    """LLaMA-2's layout at a tiny size: untied input/output embeddings, no pad id, fp16 weights on disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(seed)
    # sharded like the hub's (model-0000k-of-0000n.safetensors + the index)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(folder, max_shard_size="40KB")


LLAMA_TOKENIZER = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "legacy": False,
                   "model_max_length": 1000000000000000019884624838656, "padding_side": "right"}


def make_llama(folder: Path, spiece: bytes, *, seed: int) -> None:
    (folder / "tokenizer.model").write_bytes(spiece)
    tok = _load_tokenizer(folder, LLAMA_TOKENIZER)
    tok.save_pretrained(folder)
    _llama(folder, tok, seed=seed)


def make_seed_llama(folder: Path, spiece: bytes, *, seed: int) -> None:
    """SEED-LLaMA's tokenizer is LLaMA's + <img>, </img> and one <img_NNNNN> per SEED code (8,192)."""
    (folder / "tokenizer.model").write_bytes(spiece)
    tok = _load_tokenizer(folder, LLAMA_TOKENIZER)
    tok.add_tokens(["<img>", "</img>"] + [f"<img_{i:05d}>" for i in range(SEED_IMAGE_TOKENS)])
    tok.save_pretrained(folder)
    _llama(folder, tok, seed=seed)


def _hub_snapshot(hub: Path, repo_id: str):
    """A folder laid out as huggingface_hub's cache holds a download of ``repo_id`` at a commit (refs/main
    names the snapshot), so ``from_pretrained(repo_id)`` resolves offline (HF_HUB_OFFLINE=1)."""
    commit = hashlib.sha1(f"avg-rehearsal/{repo_id}/{FIXTURE_VERSION}".encode()).hexdigest()
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


# ------------------------------------------------------------------------------------------- all of it
def fixture_params(args) -> dict:
    return {"version": FIXTURE_VERSION, "seed": args.seed, "flickr30k": [args.n_train, args.n_val, args.n_test],
            "coco": [args.n_train, args.n_restval, args.n_val, args.n_test]}


def make_fixture(out: Path, args) -> dict:
    from avg.data.demo import train_captions

    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    made = {"flickr30k": str(make_flickr30k(out / "flickr30k", n_train=args.n_train, n_val=args.n_val,
                                            n_test=args.n_test, seed=args.seed)),
            "coco": str(make_coco(out / "coco", n_train=args.n_train, n_restval=args.n_restval, n_val=args.n_val,
                                  n_test=args.n_test, seed=args.seed))}
    # the tokenizers stand in for pretrained ones: trained on text no split of the fixture uses for evaluation
    texts = train_captions(made["flickr30k"]) + train_captions(made["coco"])
    llama_model = llama_spiece(texts)
    hub = out / "hf" / "hub"
    shutil.rmtree(hub, ignore_errors=True)
    for repo_id, build in ((CLIP_HUB, lambda d: make_clip(d, seed=args.seed)),
                           (T5_HUB, lambda d: make_t5(d, texts, seed=args.seed)),
                           (LLAMA_HUB, lambda d: make_llama(d, llama_model, seed=args.seed))):
        snap = _hub_snapshot(hub, repo_id)
        snap.mkdir(parents=True)
        build(snap)
        made[repo_id] = str(snap)
    with atomic_dir(out / SEED_DIR) as tmp:
        make_seed_llama(tmp, llama_model, seed=args.seed)
    made["seed-llama"] = str(out / SEED_DIR)
    write_json({**fixture_params(args), "made": made}, out / MARKER)
    return made


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="data/rehearsal", help="where the datasets, the hub cache (hf/) and seed-llama/ go")
    p.add_argument("--n-train", type=int, default=48, help="train images of each dataset")
    p.add_argument("--n-restval", type=int, default=16, help="COCO restval images (trained on)")
    p.add_argument("--n-val", type=int, default=16, help="val images of each dataset")
    p.add_argument("--n-test", type=int, default=16, help="test images of each dataset")
    p.add_argument("--seed", type=int, default=0, help="seed of the images, captions and random weights")
    p.add_argument("--force", action="store_true", help="rebuild even when --out-dir holds this fixture")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out_dir)
    marker = out / MARKER
    if not args.force and marker.is_file():
        try:
            held = read_json(marker)
        except ValueError:
            held = {}
        if {k: held.get(k) for k in fixture_params(args)} == fixture_params(args):
            print(f"{out}: rehearsal fixture already built (use --force to rebuild)", file=sys.stderr)
            return held["made"]
    made = make_fixture(out, args)
    print(f"{out}: rehearsal fixture built (Flickr30K and COCO look-alikes, hub cache in {out / 'hf'}, "
          f"{out / SEED_DIR})", file=sys.stderr)
    return made


if __name__ == "__main__":
    run_main(main)
