"""``handler.response_format: torchserve``: ``/predictions`` answered as TorchServe's stock ``image_classifier``.

The stock handler answers each image with ``{label: probability}`` for its top 5 classes, best first
(``ts.torch_handler.image_classifier.ImageClassifier.postprocess`` -> ``ts.utils.util.map_class_to_label``:
softmax, ``torch.topk``, the label of each class from ``index_to_name.json``, or the class index as a
string without one). With this setting a classifier archive keeps that shape for requests that are not
explained, so that clients of an ``image_classifier`` archive keep working, while ``/explanations``
answers our object with heatmaps. The typed result (what the audit records) is the same either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from handlers.tasks.registry import TaskResult

__all__ = ["RESPONSE_FORMATS", "TORCHSERVE", "TorchServeAnswer", "stock_predictions"]

TORCHSERVE = "torchserve"
RESPONSE_FORMATS = ("torchserve_cam", TORCHSERVE)


def stock_predictions(probabilities: torch.Tensor, labels: Sequence[str], top_k: int) -> dict[str, float]:
    """``{label: probability}`` of the ``top_k`` classes of one image's ``[K]`` probabilities, best first:
    what ``map_class_to_label`` makes of ``torch.topk`` (float32 probabilities as Python floats; equal
    labels keep the last, as a dict does)."""
    scores, indices = probabilities.topk(top_k)
    return {labels[index]: score for score, index in zip(scores.tolist(), indices.tolist())}


@dataclass
class TorchServeAnswer(TaskResult):
    """A classifier's result answered in the stock shape: ``body`` is ``stock``, without our header."""

    stock: dict[str, float] = field(default_factory=dict)

    def body(self, header: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.stock)
