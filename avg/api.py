"""Ask a trained AVG retriever questions from Python.

    from avg import Retriever
    r = Retriever.from_run("outputs/demo")                  # the run's best T5 retriever, test gallery
    hits = r.search(["a tiny blue hexagon"], k=5)           # per query: [Hit(image_id, image_path, score)]
    hits = r.search(["a tiny blue hexagon"], k=5, rerank="embed")   # + the embedding rerank
    hits = r.search(["a tiny blue hexagon"], k=5, rerank="lm")      # + the trained LM reranker

``from_run`` reads the stage folders a run wrote (DESIGN.md's layout under ``outputs/<dataset>/``):
the model (``train_retriever_t5_stage2/best``, else ``train_retriever_t5/best``, or a ``best/`` folder given
directly), its stage's search settings (beam, batch, collision seed from ``config.json``), the
gallery (``prepare_retriever_dataset/gallery_<split>.json``; or any codes folder / gallery json, optionally cut
to a list of image ids), the image files and CLIP features (``prepare_emb/``), the embedding rerank's
fusion weight chosen on val (``rerank_embed/fusion.json``) and the trained LM reranker
(``finetune_reranker_llama/best``, loaded on first use; it reranks the depth of the lists it was validated on).

A query is ranked exactly as the stage's evaluation ranks it (the same search,
avg.retriever.evaluate.rank_queries, batched by token length): a retriever that reads the query's
CLIP text feature gets it from the run's CLIP text encoder, rounded to the precision ``prepare_emb/`` stores
features in, so a caption gets the feature the stage gave it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from avg.artifacts.registry import out as stage_out
from avg.core.io import InputError, read_json

PathLike = Union[str, os.PathLike]
RETRIEVER_STAGES = (stage_out("train_retriever_t5_stage2"), stage_out("train_retriever_t5"))
SPLITS = ("train", "val", "test")


class Hit(NamedTuple):
    image_id: str
    image_path: Optional[str]  # None when the run records no image file for it
    score: float


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "voken_vocab.json").is_file()


def find_retriever(run: PathLike, stage: Optional[str] = None) -> tuple[Path, Path]:
    """(model folder, run root) for a run root (``outputs/<dataset>``), a stage folder or a ``best/`` folder."""
    run = Path(run)
    if not run.is_dir():
        raise InputError(f"{run}: run directory not found")
    if _is_model_dir(run):  # .../<stage>/best
        return run, run.parent.parent
    if _is_model_dir(run / "best"):  # .../<stage>
        return run / "best", run.parent
    for name in ([stage] if stage else RETRIEVER_STAGES):
        if _is_model_dir(run / name / "best"):
            return run / name / "best", run
    want = f"{stage}/best" if stage else " or ".join(f"{s}/best" for s in RETRIEVER_STAGES)
    raise InputError(f"{run}: no trained T5 retriever here (expected {want} with config.json and voken_vocab.json; "
                     "train one with scripts/train_retriever_t5.sh)")


def _emb_dtype(index: dict) -> Optional[torch.dtype]:
    name = str((index.get("encoder") or {}).get("dtype", "float32"))
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name)


class Retriever:
    """A trained T5 retriever over a gallery (construct with :meth:`from_run`)."""

    def __init__(self, model, gallery, *, num_beams: int = 20, batch_size: int = 32, device=None,
                 image_paths: Optional[dict] = None, emb=None, text_encoder=None,
                 rerank_weight: Optional[float] = None, rerank_k: Optional[int] = None,
                 fast_search: bool = False, lm_reranker: Optional[PathLike] = None,
                 emb_dir: Optional[PathLike] = None) -> None:
        from avg.retriever.evaluate import logits_vocab_size

        self.model, self.gallery = model, gallery
        self.device = torch.device(device) if device is not None else next(model.model.parameters()).device
        self.num_beams, self.batch_size, self.fast_search = int(num_beams), int(batch_size), bool(fast_search)
        self.image_paths = dict(image_paths or {})
        self.emb, self._text_encoder, self._store = emb, text_encoder, None
        self.rerank_weight, self.rerank_k = rerank_weight, rerank_k
        self.lm_reranker, self.emb_dir = lm_reranker, emb_dir
        self._lm_step = None
        self.index = gallery.build_index(model.vocab, logits_vocab_size(model.model), device=self.device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run(cls, run: PathLike, *, stage: Optional[str] = None, gallery: Union[str, PathLike] = "test",
                 image_ids: Optional[Sequence[str]] = None, device: str = "auto", num_beams: Optional[int] = None,
                 batch_size: Optional[int] = None, image_root: Optional[PathLike] = None,
                 reranker: Optional[PathLike] = None) -> "Retriever":
        """The retriever a run trained, over ``gallery``: a split name (that split's gallery, as the
        stage evaluated it), a codes folder (``codes.json``: every image in it) or a gallery json
        ({image_id: code}); ``image_ids`` keeps a subset of it. ``reranker``: a saved LM reranker
        for ``rerank="lm"`` (default: the run's ``finetune_reranker_llama/best``)."""
        from avg.models.clip import resolve_device
        from avg.retriever.t5 import load_t5_retriever

        model_dir, root = find_retriever(run, stage)
        stage_cfg_path = model_dir.parent / "config.json"
        stage_cfg = read_json(stage_cfg_path) if stage_cfg_path.is_file() else {}
        dev = resolve_device(device)
        model = load_t5_retriever(model_dir, dev)
        seed = int(stage_cfg.get("collision_seed", 0))
        g = _load_gallery(root, gallery, seed, stage_cfg)
        if image_ids is not None:
            row = {i: r for r, i in enumerate(g.image_ids)}
            missing = [i for i in image_ids if str(i) not in row]
            if missing:
                raise InputError(f"{g.name}: image id {missing[0]!r} is not in this gallery ({len(missing)} missing)")
            g = g.subset([row[str(i)] for i in image_ids], name=f"{g.name}[{len(image_ids)} images]")
        emb = _load_emb(root)
        fusion = _read_fusion(root)
        lm_dir = Path(reranker) if reranker is not None else root / stage_out("finetune_reranker_llama") / "best"
        return cls(model, g, num_beams=num_beams or int(stage_cfg.get("num_beams", 20)),
                   batch_size=batch_size or int(stage_cfg.get("eval_batch_size", 32)), device=dev,
                   image_paths=_image_paths(emb, image_root), emb=emb,
                   rerank_weight=fusion.get("chosen_weight"), rerank_k=fusion.get("topk"),
                   fast_search=bool(stage_cfg.get("fast_search", False)), lm_reranker=lm_dir,
                   emb_dir=root / stage_out("prepare_emb") if emb is not None else None)

    # ------------------------------------------------------------------ queries
    @property
    def text_encoder(self):
        """The run's CLIP text encoder (loaded on first use; only the query prefix and the embedding rerank need it)."""
        if self._text_encoder is None:
            from avg.models.clip import load_clip

            enc = dict((self.emb.index.get("encoder") if self.emb is not None else None) or self.model.encoder or {})
            if not enc.get("model"):
                raise InputError("this run records no CLIP text encoder (prepare_emb/index.json or query_prefix.json): "
                                 "cannot encode free-text queries")
            self._text_encoder = load_clip(enc.get("backend", "open_clip"), enc["model"], enc.get("pretrained"),
                                           device=str(self.device), normalize=True)
        return self._text_encoder

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 [n, D] CLIP text features, rounded to prepare_emb/'s storage precision (as the stages read them)."""
        feats = self.text_encoder.encode_texts(list(texts)).float().cpu()
        dtype = _emb_dtype(self.emb.index) if self.emb is not None else None
        return feats.to(dtype).float() if dtype is not None else feats

    def search(self, queries: Union[str, Sequence[str]], k: int = 10, *, rerank: Optional[str] = None,
               show_progress: bool = False) -> list[list[Hit]]:
        """Top-``k`` gallery images per query, best first. ``rerank="embed"``: the retriever's top
        ``rerank_k`` re-scored with the CLIP cosine fused at the weight the ``rerank_embed`` stage
        chose on val (scores are then the fused scores). ``rerank="lm"``: the top of the depth the
        reranker was validated on (its ``list_depth``; the beam for rerankers that predate it) reordered by
        the trained LM reranker's score fused with the retriever's (avg.reranker.step), as its test
        stage ranks the same lists. At most as many images as the beam returns, and with a rerank at
        most its depth (the search widens its beam to ``k`` and to the LM reranker's depth)."""
        from avg.retriever.evaluate import rank_queries

        texts = [queries] if isinstance(queries, str) else list(queries)
        for n, q in enumerate(texts, 1):
            if not isinstance(q, str) or not q.strip():
                raise InputError(f"query {n}: empty query (a query is a non-empty caption)")
        if int(k) < 1:
            raise InputError(f"k={k}: ask for at least one image")
        if rerank not in (None, "embed", "lm"):
            raise InputError(f"rerank={rerank!r}: expected None, 'embed' or 'lm'")
        step = self.lm_step() if rerank == "lm" else None
        if rerank == "embed" and self.rerank_weight is None:
            raise InputError("no fusion weight (rerank_embed/fusion.json): run scripts/rerank_embed.sh on this run first")
        if rerank == "embed" and self.emb is None:
            raise InputError("the embedding rerank needs the run's prepare_emb/ (CLIP image features)")
        if rerank == "embed" and self._store is None:
            from avg.reranker.embed import FeatureStore

            self._store = FeatureStore(self.emb)
        if not texts:
            return []
        need_feats = self.model.prefix is not None or rerank == "embed" or (step is not None and step.needs_features)
        feats = self.encode(texts) if need_feats else None
        depth = int(step.meta.get("list_depth") or 0) if step is not None else 0
        beams = max(self.num_beams, int(k), depth)
        ranked = rank_queries(self.model.model, self.model.tokenizer, self.model.vocab, texts, self.gallery, beams,
                              self.batch_size, self.device, index=self.index, max_length=self.model.max_length,
                              desc="search", show_progress=show_progress, restrict_to_vokens=self.fast_search,
                              normalize=self.model.normalize, prefix=self.model.prefix,
                              query_features=feats if self.model.prefix is not None else None)
        if rerank == "embed":
            ranked = [self._embed_rerank(ids, scores, feats[n].numpy()) for n, (ids, scores) in enumerate(ranked)]
        if step is not None:
            depth = depth or beams
            ranked = step.rerank(texts, [ids[:depth] for ids, _ in ranked], [s[:depth] for _, s in ranked], feats)
        return [[Hit(i, self.image_paths.get(i), float(s)) for i, s in zip(ids[:k], scores[:k])] for ids, scores in ranked]

    def lm_step(self):
        """The trained LM reranker as a pipeline step (loaded on first use)."""
        if self._lm_step is None:
            from avg.reranker.saving import META_FILE
            from avg.reranker.step import LmRerankStep

            if self.lm_reranker is None or not (Path(self.lm_reranker) / META_FILE).is_file():
                raise InputError(f"no trained LM reranker in {self.lm_reranker}: run scripts/finetune_reranker_llama.sh "
                                 "on this run first, or name one (from_run(reranker=...), --reranker)")
            self._lm_step = LmRerankStep.load(self.lm_reranker, device=self.device,
                                              emb_dir=str(self.emb_dir) if self.emb_dir is not None else None)
        return self._lm_step

    def _embed_rerank(self, ids: list, scores: list, text: np.ndarray) -> tuple[list, list]:
        from avg.reranker.embed import l2_normalize, rerank_list

        k = int(self.rerank_k or len(ids))
        cands = ids[:k]
        if not cands:
            return [], []
        return rerank_list(cands, scores[:k], self._store.images(cands, "gallery") @ l2_normalize(text),
                           float(self.rerank_weight))

    def __repr__(self) -> str:
        return (f"Retriever({len(self.gallery)} images in {self.gallery.name}, beam {self.num_beams}, "
                f"score {self.model.normalize}, device {self.device})")


# ---------------------------------------------------------------------- run files
def _load_gallery(root: Path, gallery: Union[str, PathLike], seed: int, stage_cfg: dict):
    from avg.search.gallery import Gallery

    if isinstance(gallery, str) and gallery in SPLITS:
        data_dir = root / stage_out("prepare_retriever_dataset")
        if not data_dir.is_dir() and stage_cfg.get("data_dir"):
            data_dir = Path(stage_cfg["data_dir"])
        path = data_dir / f"gallery_{gallery}.json"
        if not path.is_file():
            raise InputError(f"{path}: no {gallery} gallery in this run (run scripts/prepare_retriever_dataset.sh)")
        return Gallery.load(path, seed=seed)
    path = Path(gallery)
    if path.is_dir():
        from avg.retriever.data import read_codes

        codes = read_codes(path, with_codebook=False)
        if not codes.images:
            raise InputError(f"{path / 'codes.json'}: no images")
        return Gallery.from_mapping({i: rec["code"] for i, rec in codes.images.items()}, seed=seed,
                                    name=str(path / "codes.json"))
    if path.is_file():
        return Gallery.load(path, seed=seed)
    raise InputError(f"gallery {str(gallery)!r}: not a split ({', '.join(SPLITS)}), a codes folder or a gallery json")


def _load_emb(root: Path):
    from avg.artifacts.emb import load_emb

    emb_dir = root / stage_out("prepare_emb")
    return load_emb(emb_dir) if (emb_dir / "index.json").is_file() else None


def _image_paths(emb, image_root: Optional[PathLike]) -> dict:
    from avg.data.sample_tables import image_paths_from_index

    return image_paths_from_index(emb.index, str(image_root) if image_root else None) if emb is not None else {}


def _read_fusion(root: Path) -> dict:
    path = root / stage_out("rerank_embed") / "fusion.json"
    if not path.is_file():
        return {}
    fusion = read_json(path)
    cfg = read_json(path.parent / "config.json") if (path.parent / "config.json").is_file() else {}
    w = fusion.get("chosen_weight")  # json reads Infinity as float inf
    return {"chosen_weight": None if w is None else float(w), "topk": int(cfg.get("topk") or 0) or None}


__all__ = ["Retriever", "Hit", "find_retriever"]
