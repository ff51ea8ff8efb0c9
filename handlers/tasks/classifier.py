"""TorchServe handler for image classifiers: top-k predictions plus CAMs for the requested classes.

JSON options beyond the common ones (see :mod:`handlers.serving.base`):

- ``targets``: class indices or label names to explain (default: the top-1 class), at most
  ``max_targets``;
- ``top_k``: how many predictions to return (default: the config's ``top_k``).

Response (``explanations`` only when the request is explained)::

    {"model": "efficientnet_lite0", "version": "1.0", "weights": "...",
     "predictions": [{"index": 285, "label": "Egyptian cat", "score": 0.62}, ...],
     "explanations": [{"target": 285, "label": "Egyptian cat", "method": "gradcam", "layers": ["bn2"],
                       "heatmap": {"format": "png", "width": 900, "height": 300, "data": "<base64>"}}]}

With ``handler.response_format: torchserve`` a request that is not explained is answered as TorchServe's
stock ``image_classifier`` answers, ``{"Egyptian cat": 0.62, ...}`` (:mod:`handlers.tasks.torchserve_format`).

This module defines exactly one class, as TorchServe's class-based handler loading requires.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cam_engine.core import model_scores
from cam_engine.targets import ClassifierOutputTarget
from handlers.serving.base import CamHandler, ParsedRequest
from handlers.serving.options import TopKOptions, read_options
from handlers.tasks.registry import TaskResult, get_task
from handlers.tasks.targets import TopClassTarget
from handlers.tasks.torchserve_format import TORCHSERVE, TorchServeAnswer, stock_predictions

__all__ = ["ClassifierHandler"]


class ClassifierHandler(CamHandler):
    """Predictions (softmax top-k) and class CAMs for any classifier the config describes."""

    task = get_task("classifier")
    task_options = task.options
    fast_forward = True  # frozen copy for predictions, channels-last for CAMs (handlers.serving.fast_forward)

    def parse_task_options(self, request: ParsedRequest, options: Mapping[str, Any]) -> None:
        """``targets`` -> list of class indices (or None for the top class); ``top_k`` -> int."""
        classes = {"classes": (len(self.labels), "classes")}
        top_k = read_options(TopKOptions, options, self.config, classes).top_k
        indices = self.class_indices(options.get("targets"), "targets", "target")
        request.task = {"targets": indices, "top_k": top_k}

    def target_count(self, request: ParsedRequest) -> int:
        return len(request.task.get("targets") or [None])  # None: the top class, one target

    def targets_for(self, request: ParsedRequest) -> list[Any]:
        indices = request.task.get("targets")
        if indices is None:
            return [TopClassTarget()]
        return [ClassifierOutputTarget(i) for i in indices]

    def build_response(
        self, request: ParsedRequest, outputs: Any, row: int, explanations: list[dict[str, Any]] | None
    ) -> TaskResult:
        logits = model_scores(outputs)[row].float()
        probabilities = torch.softmax(logits, dim=-1)
        scores, indices = probabilities.topk(request.task["top_k"])
        predictions = [
            {"index": int(i), "label": self.labels[int(i)], "score": round(float(s), 6)}
            for s, i in zip(scores.tolist(), indices.tolist())
        ]
        if explanations is None and self.config.response_format == TORCHSERVE:
            stock = stock_predictions(probabilities, self.labels, request.task["top_k"])
            return TorchServeAnswer(self.task.name, predictions, None, {}, stock)
        if explanations is None:
            return TaskResult(self.task.name, predictions)
        targets = request.task.get("targets") or [int(logits.argmax())]
        meta = self.explanation_meta(request)
        explained = [
            {"target": target, "label": self.labels[target], **meta, **pictures}
            for target, pictures in zip(targets, explanations)
        ]
        return TaskResult(self.task.name, predictions, explained)
