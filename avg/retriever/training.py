"""What the T5 and LLaMA retriever trainers share beyond the generic loop (:mod:`avg.train.loop`):
split loading, the check that prepare_retriever_dataset/ matches the model's vokens, their evaluation and
checkpoint flags, and the up-front input checks."""
from __future__ import annotations

from pathlib import Path

from avg.retriever.data import load_queries
from avg.search.gallery import Gallery
from avg.retriever.vocab import VOCAB_FILE, VokenVocab
from avg.train.loop import add_checkpoint_args
from avg.core.io import InputError, read_json


def load_split(data_dir: Path, split: str, code_len: int, seed: int):
    qpath, gpath = data_dir / f"{split}.jsonl", data_dir / f"gallery_{split}.json"
    if not qpath.is_file() or not gpath.is_file():
        return [], None
    queries = load_queries(qpath, code_len=code_len)
    gallery = Gallery.load(gpath, seed=seed)
    if len(gallery) and code_len is not None and gallery.code_len != code_len:
        raise InputError(f"{gpath}: codes of length {gallery.code_len}, the vocabulary expects {code_len}")
    return queries, gallery


VOCAB_KEYS = ("num_levels", "codebook_size", "shared_codebook", "code_len", "disambiguation", "disambiguation_size")


def check_data_matches_vocab(data_dir, vocab, vocab_source) -> None:
    """Stop when prepare_retriever_dataset/ was built from other codes than the model's vokens: its targets
    would be the wrong tokens (or fall outside the vocabulary) -- never a size-mismatch traceback."""
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        return
    data = read_json(meta_path).get("codes_meta") or {}
    model = vocab.to_dict()
    diff = [f"{k} {data[k]!r} in the data vs {model[k]!r} in the model" for k in VOCAB_KEYS
            if k in data and data[k] != model[k]]
    if diff:
        raise InputError(f"{meta_path}: built from codes that disagree with the retriever's vokens ({vocab_source}): "
                         f"{'; '.join(diff)}; rebuild prepare_retriever_dataset/ from the codes the model was made with, or "
                         "train a retriever on these codes")


def add_eval_and_checkpoint_args(p, *, eval_batch_size: int, eval_train_queries: int, log_every: int,
                                 fast_search_help: str) -> None:
    """The evaluation and checkpoint/logging flag groups every retriever trainer takes."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (0: only after the last)")
    g.add_argument("--eval-train-queries", type=int, default=eval_train_queries, help="fixed random train queries also evaluated (0: none)")
    g.add_argument("--num-beams", type=int, default=20, help="beam size of the constrained search (R@K needs >= K)")
    g.add_argument("--eval-batch-size", type=int, default=eval_batch_size, help="queries per search batch (bounds memory)")
    g.add_argument("--fast-search", action="store_true", help=fast_search_help)
    g.add_argument("--collision-seed", type=int, default=0, help="seed of the order among images sharing a code")
    g.add_argument("--skip-test", action="store_true", help="do not evaluate the best model on test")
    add_checkpoint_args(p, log_every=log_every)


def check_inputs(data_dir, *, codes_dir=None, init_from=None) -> None:
    """Fail on a wrong path before anything is written into the output dir."""
    data_dir = Path(data_dir)
    need = []
    if not any(data_dir.glob("gallery_*.json")):
        need.append((data_dir / "gallery_<split>.json", "run scripts/prepare_retriever_dataset.sh first"))
    if codes_dir is not None:
        need.append((Path(codes_dir) / "codes.json", "run scripts/generate_codes.sh first"))
    if init_from is not None:
        need.append((Path(init_from) / "voken_vocab.json", "point --init-from at a saved retriever (<out-dir>/best)"))
    missing = [f"{p}: not found ({hint})" for p, hint in need if not p.is_file()]
    if missing:
        raise InputError("; ".join(missing))
    if init_from is not None:  # a saved retriever's vokens are known up front: check before writing anything
        check_data_matches_vocab(data_dir, VokenVocab.load(init_from), Path(init_from) / VOCAB_FILE)
