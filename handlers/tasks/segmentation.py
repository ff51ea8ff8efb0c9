"""TorchServe handler for semantic segmentation (torchvision DeepLabV3, FCN): a class mask plus class CAMs.

JSON options beyond the common ones (see :mod:`handlers.serving.base`):

- ``classes``: class indices or labels to explain (default: the class with the largest predicted
  region, background excluded), at most ``max_targets``.

Each explained class gets the CAM of ``SemanticSegmentationTarget`` over the pixels the model
assigns to it in the same forward pass (a class the model does not predict anywhere gets an
all-zero heatmap and ``"pixels": 0``).

Response::

    {"model": "deeplabv3_mobilenet_v3_large", "version": "1.0", "weights": "...",
     "mask": {"format": "png", "width": 640, "height": 480, "data": "<8-bit PNG of class indices>"},
     "classes": [{"index": 0, "label": "__background__", "pixels": 250000, "fraction": 0.81}, ...],
     "explanations": [{"target": 15, "label": "person", "pixels": 58000, "method": "gradcam",
                       "layers": ["backbone.16"], "heatmap": {...}}]}

The mask has the submitted image's size: the logits are mapped back through the preprocessing's
exact inverse (bilinear) before the per-pixel argmax.

This module defines exactly one class, as TorchServe's class-based handler loading requires.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import torch

from handlers.config import ConfigError
from handlers.serving.base import CamHandler, ParsedRequest, encode_png
from handlers.serving.preprocess import to_source
from handlers.tasks.registry import TaskResult, get_task
from handlers.tasks.targets import PredictedRegionTarget, region_class

__all__ = ["SegmentationHandler"]


class SegmentationHandler(CamHandler):
    """A class mask aligned with the image, the classes present, and per-class region CAMs."""

    task = get_task("segmentation")
    task_options = task.options

    def warm_up_targets(self) -> list[Any]:
        if len(self.labels) > 256:
            raise ConfigError(f"handler.labels: {len(self.labels)} classes do not fit the 8-bit mask PNG")
        return [PredictedRegionTarget(None, self.config.segmentation.background_class)]

    def parse_task_options(self, request: ParsedRequest, options: Mapping[str, Any]) -> None:
        """``classes`` -> list of class indices, or None for the largest predicted class."""
        request.task = {"classes": self.class_indices(options.get("classes"), "classes", "class")}

    def targets_for(self, request: ParsedRequest) -> list[Any]:
        background = self.config.segmentation.background_class
        classes = request.task["classes"] or [None]
        return [PredictedRegionTarget(c, background) for c in classes]

    def build_response(
        self, request: ParsedRequest, outputs: Any, row: int, explanations: list[dict[str, Any]] | None
    ) -> TaskResult:
        logits = outputs[row].float()  # [C, H, W] at the model input
        source = to_source(logits, request.geometry)  # [C, h, w] on the submitted image
        mask = source.argmax(dim=0).to(torch.uint8).cpu()
        height, width = mask.shape
        counts = torch.bincount(mask.reshape(-1).long(), minlength=logits.shape[0]).tolist()
        total = height * width
        mask_field = {
            "format": "png",
            "width": int(width),
            "height": int(height),
            "data": base64.b64encode(encode_png(mask.numpy())).decode("ascii"),
        }
        classes = [
            {"index": c, "label": self.labels[c], "pixels": int(counts[c]), "fraction": round(counts[c] / total, 6)}
            for c in sorted(range(len(counts)), key=lambda c: -counts[c])
            if counts[c] > 0
        ]
        if explanations is None:
            return TaskResult(self.task.name, classes, None, {"mask": mask_field})
        explained_classes = request.task["classes"] or [region_class(logits, self.config.segmentation.background_class)]
        meta = self.explanation_meta(request)
        explained = [
            {"target": c, "label": self.labels[c], "pixels": int(counts[c]), **meta, **pictures}
            for c, pictures in zip(explained_classes, explanations)
        ]
        return TaskResult(self.task.name, classes, explained, {"mask": mask_field})
