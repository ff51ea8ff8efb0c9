"""Label sets the model configs name by alias (``labels: imagenet`` ...), from library metadata (no download)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["imagenet_labels", "coco_labels", "voc_labels", "resolve_labels", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the model configs (a labels file is relative to it)


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's weight metadata (no download)."""
    import torchvision

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def coco_labels() -> list[str]:
    """The 91 COCO detection categories torchvision's detectors use (index 0 ``__background__``)."""
    import torchvision

    return list(torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def voc_labels() -> list[str]:
    """The 21 Pascal VOC categories torchvision's segmentation models use (index 0 ``__background__``)."""
    import torchvision

    return list(torchvision.models.segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.meta["categories"])


def resolve_labels(handler: Mapping[str, Any]) -> list[str] | None:
    """A config's ``labels`` as a list: the aliases ``imagenet``/``coco``/``voc``/``coco80`` expanded, a
    list as given, a JSON file (list, or index -> name mapping) relative to :data:`CONFIG_DIR`, None for
    ``checkpoint`` (the weights file names them) or no labels."""
    labels = handler.get("labels")
    if labels == "imagenet":
        return imagenet_labels()
    if labels == "coco":
        return coco_labels()
    if labels == "voc":
        return voc_labels()
    if labels == "coco80":
        from handlers.models.yolo import coco80_labels

        return coco80_labels()
    if labels == "checkpoint":  # read from the weights file by model_store.build
        return None
    if isinstance(labels, list):
        return [str(label) for label in labels]
    if isinstance(labels, str):
        path = Path(labels)
        if not path.is_absolute():
            path = CONFIG_DIR / path
        loaded = json.loads(path.read_text())
        return list(loaded.values()) if isinstance(loaded, dict) else list(loaded)
    return None
