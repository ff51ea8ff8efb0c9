"""Label sets the model configs name by alias (``labels: imagenet`` ...): the one reader lives in
:mod:`handlers.models.labels` (the handler uses the same); this module keeps the builder's names for it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handlers.models.labels import coco_labels, imagenet_labels, read_labels, voc_labels

__all__ = ["imagenet_labels", "coco_labels", "voc_labels", "resolve_labels", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the model configs (a labels file is relative to it)


def resolve_labels(handler: Mapping[str, Any], base_dir: Path = CONFIG_DIR) -> list[str] | None:
    """A config's ``labels`` as a list (:func:`handlers.models.labels.read_labels`), None for
    ``checkpoint`` or no labels."""
    return read_labels(handler.get("labels"), base_dir)
