"""The text side of the demo's small language models (tools/make_demo_t5.py, tools/make_demo_llama.py):
the training captions they may see and a caption BPE trained on them."""
from __future__ import annotations

import os
from pathlib import Path


def train_captions(annotations: str | os.PathLike) -> list[str]:
    """Captions of the TRAIN split only (restval counts as train): what the demo tokenizers may see."""
    from avg.data.karpathy import load_karpathy

    data = load_karpathy(annotations, Path(annotations).parent, check_files=False)
    return [c for im in data.split("train") for c in im.captions]


def train_caption_bpe(texts, vocab_size: int, special_tokens: list[str]):
    """A byte-pair ``tokenizers.Tokenizer`` over lower-cased Metaspace words ('▁' marks a word start,
    as in SentencePiece), trained on ``texts`` with ``special_tokens`` first (ids 0, 1, ...).

    BPE rather than Unigram: the ``tokenizers`` Unigram trainer returns a near character-level
    vocabulary on small caption sets. The caller adds its model family's post-processor (T5 appends
    ``</s>``, LLaMA prepends ``<s>``) and wraps it in a ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok
