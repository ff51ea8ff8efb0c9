"""Hugging Face transformers image classifiers (``architecture: transformers``), offline.

``weights`` is a local ``save_pretrained`` directory (``config.json`` + ``model.safetensors`` and,
usually, ``preprocessor_config.json``). The model loads with ``AutoModelForImageClassification``
(``local_files_only``: never a download); labels come from ``config.id2label``; preprocessing from the
saved image processor (size, crop, mean/std, resample); the reshape from the model type (ViT and DeiT
tokens: ``vit``, whose grid inference drops DeiT's two prefix tokens; Swin: ``swin``; ConvNeXt, ResNet
and other convolutional families: ``none``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["HF_ARCHITECTURE", "is_pretrained_dir", "load_classifier", "preprocessing_from_processor", "reshape_for"]

HF_ARCHITECTURE = "transformers"
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}
_TOKEN_MODELS = {"vit": "vit", "deit": "vit", "beit": "vit", "dinov2": "vit", "data2vec-vision": "vit",
                 "swin": "swin", "swinv2": "swin"}  # fmt: skip


def is_pretrained_dir(path: Path) -> bool:
    """Whether ``path`` is a ``save_pretrained`` directory (it holds ``config.json``)."""
    return path.is_dir() and (path / "config.json").is_file()


def reshape_for(model_type: str) -> str:
    """The reshape a Hugging Face ``model_type``'s CAM layers need (``none`` for convolutional ones)."""
    return _TOKEN_MODELS.get(model_type, "none")


def _size(value: Any, fallback: int) -> tuple[int, int] | int:
    """An image processor's ``size``/``crop_size`` -> ``(h, w)``, or an int for ``shortest_edge``."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
    return fallback


def preprocessing_from_processor(directory: Path) -> dict[str, Any]:
    """The ``handler.preprocessing`` keys equal to the saved image processor's (an empty dict when there
    is none): resize then optional centre crop, mean/std, interpolation."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return {}
    processor = json.loads(path.read_text())
    keys: dict[str, Any] = {}
    if processor.get("do_normalize", True) and "image_mean" in processor:
        keys["mean"] = [float(v) for v in processor["image_mean"]][:3]
        keys["std"] = [float(v) for v in processor["image_std"]][:3]
    if processor.get("do_normalize") is False:
        keys["mean"], keys["std"] = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    keys["interpolation"] = _RESAMPLE.get(int(processor.get("resample", 2)), "bilinear")
    size = _size(processor.get("size"), 224)
    crop_size = _size(processor.get("crop_size"), 0) if processor.get("do_center_crop") else 0
    if "crop_pct" in processor and isinstance(size, int):  # ConvNeXt/ResNet: resize to size/crop_pct, crop size
        crop_pct = float(processor.get("crop_pct") or 1.0)
        if size < 384 and crop_pct < 1.0:
            keys.update(input_size=[size, size], resize="shorter_side", resize_size=[int(size / crop_pct)] * 2, crop=True)
        else:
            keys.update(input_size=[size, size], resize="stretch")
    elif crop_size:
        crop = [crop_size, crop_size] if isinstance(crop_size, int) else list(crop_size)
        resized = [size, size] if isinstance(size, int) else list(size)
        mode = "shorter_side" if isinstance(size, int) else "stretch"
        keys.update(input_size=crop, resize=mode, resize_size=resized, crop=True)
    else:
        keys.update(input_size=[size, size] if isinstance(size, int) else list(size), resize="stretch")
    return keys


def load_classifier(directory: Path) -> tuple[nn.Module, list[str], str]:
    """``(model in eval mode, labels from id2label, reshape)`` from a ``save_pretrained`` directory."""
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no progress bars in build output or worker logs
    model = AutoModelForImageClassification.from_pretrained(str(directory), local_files_only=True)
    id2label = getattr(model.config, "id2label", None) or {}
    labels = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(int(model.config.num_labels))]
    return model.eval(), labels, reshape_for(str(getattr(model.config, "model_type", "")))
