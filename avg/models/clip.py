"""Frozen CLIP encoders behind one small interface, so later stages never care which backend.

Two backends:
  * ``open_clip``: ``open_clip.create_model_and_transforms(name, pretrained=TAG_OR_FILE)``, e.g.
    ``ViT-L-14-336`` / ``openai`` (the paper's encoder) or the project's own ``avg-demo-vit`` with a
    local checkpoint file. The project's configs dir is registered with open_clip first, so
    custom architectures resolve by name.
  * ``hf``: ``transformers.CLIPModel.from_pretrained(name_or_dir)`` with its image processor and
    tokenizer, e.g. ``openai/clip-vit-large-patch14-336`` or a local ``save_pretrained`` dir.

On CUDA the towers run under fp16 autocast; on the CPU in float32. Features come back as float32
CPU tensors, L2-normalised when the encoder was built with ``normalize=True`` -- the choice is
part of ``describe()`` so the ``prepare_emb/`` index records it and readers never guess.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from avg.core.io import InputError

CLIP_CONFIGS_DIR = Path(__file__).resolve().parent / "clip_configs"
BACKENDS = ("open_clip", "hf")
PRECISIONS = ("auto", "fp32", "fp16")

log = logging.getLogger("avg.clip")


def register_clip_configs() -> None:
    """Make the project's open_clip model configs (e.g. ``avg-demo-vit``) resolvable by name."""
    import open_clip

    if "avg-demo-vit" not in open_clip.list_models():
        open_clip.add_model_config(CLIP_CONFIGS_DIR)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision  # fp16 on the CPU runs (torch's CPU autocast), slower than fp32: for rehearsing the GPU path


class ClipEncoder:
    """A frozen two-tower CLIP: ``preprocess`` PIL -> tensor, ``encode_images``, ``encode_texts``."""

    backend: str = ""

    def __init__(self, model_name: str, pretrained: Optional[str], *, device: str = "auto", precision: str = "auto", normalize: bool = True) -> None:
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.normalize = normalize
        self._dim: Optional[int] = None
        # captions longer than the text encoder's context, cut by its tokenizer (counted, never an error)
        self.truncated_captions = 0

    # --- backend hooks -------------------------------------------------------------------
    def image_transform(self):
        """A picklable callable PIL.Image -> [3, H, W] tensor (safe to hand to DataLoader workers)."""
        raise NotImplementedError

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def _image_features_and_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled projected features [B, dim], the vision tower's last-layer patch tokens [B, N, width])."""
        raise InputError(f"CLIP backend {self.backend!r} ({self.model_name}) gives no patch tokens: --image-grid needs a ViT")

    # --- shared ----------------------------------------------------------------------------
    def preprocess(self, image) -> torch.Tensor:
        return self.image_transform()(image)

    def _autocast(self):
        if self.precision == "fp16":
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def _finish(self, feats: torch.Tensor) -> torch.Tensor:
        feats = feats.float()  # normalise in float32, outside autocast
        if self.normalize:
            feats = F.normalize(feats, dim=-1)
        return feats.cpu()

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed batch -> [B, dim] float32 CPU features."""
        with self._autocast():
            feats = self._image_features(pixels.to(self.device, non_blocking=True))
        return self._finish(feats)

    @torch.no_grad()
    def encode_images_and_grid(self, pixels: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Like encode_images, plus the ViT's patch tokens average-pooled to a ``grid`` x ``grid``
        layout, row-major from the top left: [B, grid * grid, width] float32 CPU (not projected,
        not normalised). What a reranker reads of *where* things are: the pooled feature keeps little
        of it (avg.reranker.model, ``grid_head``)."""
        with self._autocast():
            feats, tokens = self._image_features_and_tokens(pixels.to(self.device, non_blocking=True))
        return self._finish(feats), pool_grid(tokens.float(), grid).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Captions -> [N, dim] float32 CPU features, in chunks of `batch_size`."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        out = []
        for start in range(0, len(texts), batch_size):
            with self._autocast():
                feats = self._text_features(texts[start:start + batch_size])
            out.append(self._finish(feats))
        return torch.cat(out)

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode_texts(["a"]).shape[1])
        return self._dim

    def describe(self) -> dict:
        """The ``encoder`` entry of the prepare_emb/ index."""
        return {"backend": self.backend, "model": self.model_name, "pretrained": self.pretrained, "normalized": bool(self.normalize), "precision": self.precision, "dim": self.dim}


class OpenClipEncoder(ClipEncoder):
    backend = "open_clip"

    def __init__(self, model_name: str, pretrained: Optional[str], **kwargs) -> None:
        super().__init__(model_name, pretrained, **kwargs)
        import open_clip

        register_clip_configs()
        if open_clip.get_model_config(model_name) is None and ":" not in model_name:
            raise InputError(f"unknown open_clip model {model_name!r} (known: built-in names and {sorted(p.stem for p in CLIP_CONFIGS_DIR.glob('*.json'))})")
        if pretrained and not Path(pretrained).is_file() and not open_clip.get_pretrained_cfg(model_name, pretrained):
            raise InputError(f"{pretrained}: neither a checkpoint file nor a pretrained tag of open_clip model {model_name!r} (tags: {open_clip.list_pretrained_tags_by_model(model_name)})")
        force_quick_gelu = _tag_needs_quick_gelu(model_name, pretrained)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=self.device, precision="fp32", force_quick_gelu=force_quick_gelu
        )
        self.model = model.eval().requires_grad_(False)
        self._preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def image_transform(self):
        return self._preprocess

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _image_features_and_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.model.visual
        if not hasattr(visual, "output_tokens"):
            return super()._image_features_and_tokens(pixels)
        visual.output_tokens = True
        try:
            pooled, tokens = visual(pixels)
        finally:
            visual.output_tokens = False
        return pooled, tokens

    def _text_features(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts))
        # a full row is either an exact fit or a cut: re-count only those (+2 for start/end tokens)
        full = (tokens[:, -1] != 0).nonzero().flatten().tolist()
        encode = getattr(self.tokenizer, "encode", None)
        self.truncated_captions += sum(encode is None or len(encode(texts[i])) + 2 > tokens.shape[1] for i in full)
        return self.model.encode_text(tokens.to(self.device))


def _tag_needs_quick_gelu(model_name: str, pretrained: Optional[str]) -> bool:
    """OpenAI weights were trained with QuickGELU; open_clip 3.x only warns on a mismatch.

    ``ViT-L-14-336`` + ``openai`` would otherwise silently run with the wrong activation.
    """
    if not pretrained or Path(pretrained).is_file():
        return False
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    model_cfg = open_clip.get_model_config(model_name) or {}
    return bool(tag_cfg.get("quick_gelu", False)) and not model_cfg.get("quick_gelu", False)


class HFClipEncoder(ClipEncoder):
    backend = "hf"

    def __init__(self, model_name: str, pretrained: Optional[str] = None, **kwargs) -> None:
        # for HF the model id / directory carries the weights; `pretrained` is only recorded
        super().__init__(model_name, pretrained, **kwargs)
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(model_name).to(self.device).eval().requires_grad_(False)
            self.image_processor = AutoImageProcessor.from_pretrained(model_name)
            self.tokenizer = AutoTokenizer.from_pretrained(model_name)
        except OSError as e:  # missing dir / files, or a hub id that cannot be fetched
            raise InputError(f"{model_name}: cannot load a transformers CLIP model, image processor and tokenizer ({e})") from None
        self._dim = int(self.model.config.projection_dim)
        self._max_len = int(self.model.config.text_config.max_position_embeddings)

    def image_transform(self):
        return _HFImageTransform(self.image_processor)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def _image_features_and_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.vision_model(pixel_values=pixels)
        return self.model.visual_projection(out.pooler_output), out.last_hidden_state[:, 1:]  # drop the class token

    def _text_features(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self._max_len, return_tensors="pt")
        full = (enc["attention_mask"].sum(1) >= self._max_len).nonzero().flatten().tolist()
        # counted by a full tokenisation (verbose=False: the truncation is ours and counted, not an error to warn of)
        self.truncated_captions += sum(len(self.tokenizer(texts[i], verbose=False)["input_ids"]) > self._max_len for i in full)
        enc = enc.to(self.device)
        return _pooled(self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))


class _HFImageTransform:
    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def pool_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, N, W] patch tokens of a square patch layout (N = n * n, row-major) -> [B, grid * grid, W]
    by adaptive average pooling (grid >= n keeps them as they are)."""
    b, n_tokens, width = tokens.shape
    side = int(round(math.sqrt(n_tokens)))
    if side * side != n_tokens:
        raise InputError(f"{n_tokens} patch tokens do not form a square layout: cannot pool them to a {grid}x{grid} grid")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    maps = tokens.transpose(1, 2).reshape(b, width, side, side)
    return F.adaptive_avg_pool2d(maps, min(grid, side)).flatten(2).transpose(1, 2).contiguous()


def _pooled(out) -> torch.Tensor:
    """transformers 4.x returns the projected tensor, 5.x a ModelOutput with it as pooler_output."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def load_clip(backend: str, model_name: str, pretrained: Optional[str] = None, *, device: str = "auto", precision: str = "auto", normalize: bool = True) -> ClipEncoder:
    """Build a frozen CLIP encoder. ``pretrained``: open_clip tag or checkpoint file (open_clip only)."""
    if backend == "open_clip":
        return OpenClipEncoder(model_name, pretrained, device=device, precision=precision, normalize=normalize)
    if backend == "hf":
        return HFClipEncoder(model_name, pretrained, device=device, precision=precision, normalize=normalize)
    raise ValueError(f"unknown CLIP backend {backend!r}; choose one of {BACKENDS}")
