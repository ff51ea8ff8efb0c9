"""CLIP pieces the CLIP handler is built from (kept out of :mod:`handlers.tasks.clip`, which TorchServe
requires to define exactly one class): the ``handler.clip`` config, the vision/text towers as small
modules, the prompt target, and the LRU cache of text embeddings."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import cam_engine
from handlers.config import ClipConfig, ConfigError

__all__ = [
    "DEFAULT_TARGET_LAYER",
    "ClipConfig",
    "ClipImageEncoder",
    "ClipTextEncoder",
    "PromptTarget",
    "TextEntry",
    "TextEmbeddingCache",
    "resolve_clip_dir",
    "clip_section",
    "clip_reshape",
    "load_clip",
    "processor_preprocessing",
    "directory_digest",
]

DEFAULT_TARGET_LAYER = "vision_model.encoder.layers.-1.layer_norm1"
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class ClipImageEncoder(nn.Module):
    """CLIP's vision tower + projection: pixel values ``[B, 3, H, W]`` -> unit image embeddings ``[B, D]``.

    Holds ``vision_model`` under the same name as ``CLIPModel`` does, so CLIPModel layer paths
    (``vision_model.encoder.layers.-1.layer_norm1``) resolve unchanged.
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return F.normalize(self.visual_projection(pooled), dim=-1)


class ClipTextEncoder(nn.Module):
    """CLIP's text tower + projection: token ids ``[L, S]`` (and mask) -> unit text embeddings ``[L, D]``."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(self.text_projection(pooled), dim=-1)


class PromptTarget:
    """One image's score for prompt ``index`` among its request's prompts (``index=None``: the top one).

    Called by cam_engine on one image's embedding ``e`` ``[D]``; ``text`` is ``[L, D]``. Returns
    ``softmax(scale * text @ e)[index]`` (``softmax=True``) or ``(scale * text @ e)[index]``.
    """

    def __init__(self, text: torch.Tensor, scale: float, index: int | None, softmax: bool) -> None:
        self.text = text
        self.scale = scale
        self.index = index
        self.softmax = softmax

    def __call__(self, image_embedding: torch.Tensor) -> torch.Tensor:
        logits = self.scale * (self.text.to(image_embedding.dtype) @ image_embedding)
        scores = torch.softmax(logits, dim=-1) if self.softmax else logits
        return scores.max() if self.index is None else scores[self.index]

    def __repr__(self) -> str:
        return f"PromptTarget(index={self.index}, softmax={self.softmax})"


@dataclass(frozen=True)
class TextEntry:
    """A cached label set: unit embeddings ``[L, D]`` and the prompts cut to the tokenizer's maximum."""

    embeddings: torch.Tensor
    truncated: tuple[tuple[int, int], ...]  # (prompt index, its token count before truncation)


class TextEmbeddingCache:
    """LRU cache: ``(model key, prompt tuple)`` -> :class:`TextEntry`, with hit/miss counters."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, tuple[str, ...]], TextEntry] = OrderedDict()

    def get(self, key: tuple[str, tuple[str, ...]]) -> TextEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple[str, tuple[str, ...]], entry: TextEntry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def resolve_clip_dir(model_dir_setting: str, archive_dir: Path) -> Path:
    """``clip.model_dir`` as a path: relative to the unpacked archive, or absolute (mounted)."""
    path = Path(model_dir_setting).expanduser()
    path = path if path.is_absolute() else Path(archive_dir) / path
    if not (path / "config.json").exists():
        raise ConfigError(f"handler.clip.model_dir: {path} has no config.json (a save_pretrained directory)")
    return path


def clip_section(handler: dict[str, Any], archive_dir: Path) -> tuple[ClipConfig, Path]:
    """Read ``handler.clip`` from the ``handler:`` mapping ``handler`` and default (in place) its target
    layer and preprocessing to the CLIP directory's; returns the parsed section and the directory."""
    config = ClipConfig.from_dict(handler.get("clip"))
    clip_dir = resolve_clip_dir(config.model_dir, archive_dir)
    handler.setdefault("target_layers", [DEFAULT_TARGET_LAYER])
    if "preprocessing" not in handler:
        handler["preprocessing"] = processor_preprocessing(clip_dir)
    return config, clip_dir


def load_clip(clip_dir: Path, tokenizer: bool = False) -> tuple[nn.Module, Any]:
    """``(CLIPModel in eval mode, its tokenizer or None)`` from a ``save_pretrained`` directory.

    Raises :class:`ConfigError` naming ``handler.clip.model_dir`` when either does not load."""
    from transformers import AutoTokenizer, CLIPModel

    try:
        clip = CLIPModel.from_pretrained(str(clip_dir))
        loaded = AutoTokenizer.from_pretrained(str(clip_dir)) if tokenizer else None
    except (OSError, ValueError) as error:
        raise ConfigError(f"handler.clip.model_dir: cannot load a CLIP from {clip_dir}: {error}") from None
    return clip.eval(), loaded


def clip_reshape(vision_config: Any, reshape: str) -> Any:
    """The CAM reshape of a CLIP vision tower: None for ``reshape: none``, else cam_engine's CLIP reshape
    for the token grid of ``vision_config`` (B/32, B/16, L/14, L/14@336)."""
    return None if reshape == "none" else cam_engine.reshape.clip_reshape_for(vision_config)


def processor_preprocessing(clip_dir: Path) -> dict[str, Any]:
    """The ``preprocessing`` mapping equivalent to the directory's CLIPImageProcessor.

    Resizing runs through :mod:`handlers.serving.preprocess` (not the processor itself) so every heatmap maps
    back exactly onto the submitted image: shorter side to ``size.shortest_edge``, centre crop to
    ``crop_size``, the processor's mean/std and resample filter.
    """
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(str(clip_dir))
    size, crop = processor.size, processor.crop_size
    crop_hw = [int(crop["height"]), int(crop["width"])] if processor.do_center_crop else None
    settings: dict[str, Any] = {
        "mean": [float(v) for v in processor.image_mean],
        "std": [float(v) for v in processor.image_std],
        "interpolation": _RESAMPLE.get(int(processor.resample), "bicubic"),
    }
    shortest = size.get("shortest_edge") if hasattr(size, "get") else getattr(size, "shortest_edge", None)
    if shortest:
        edge = int(shortest)
        settings.update(input_size=crop_hw or [edge, edge], resize="shorter_side", resize_size=[edge, edge], crop=True)
    else:
        resized = [int(size["height"]), int(size["width"])]
        settings.update(input_size=crop_hw or resized, resize="stretch", resize_size=resized, crop=crop_hw is not None)
    return settings


def directory_digest(path: Path) -> str:
    """A short sha256 over a directory's file names and bytes (what build_info records)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
