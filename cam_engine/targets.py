"""Targets: callables that turn one image's model output into the scalar a CAM explains.

They follow pytorch-grad-cam's semantics: each target is called on the output for *one* image
(a row of logits ``[num_classes]``, a segmentation map ``[num_classes, H, W]``, a detection dict...)
and returns a scalar (or a tensor that is summed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision

__all__ = [
    "ClassifierOutputTarget",
    "ClassifierOutputSoftmaxTarget",
    "ClassifierOutputReST",
    "BinaryClassifierOutputTarget",
    "SoftmaxOutputTarget",
    "RawScoresOutputTarget",
    "SemanticSegmentationTarget",
    "FasterRCNNBoxScoreTarget",
    "SimilarityToConceptTarget",
    "DifferenceFromConceptTarget",
    "FinerWeightedTarget",
]


class ClassifierOutputTarget:
    """The raw score (logit) of ``category``."""

    def __init__(self, category: int):
        self.category = int(category)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        if model_output.ndim == 1:
            return model_output[self.category]
        return model_output[:, self.category]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.category})"


class ClassifierOutputSoftmaxTarget(ClassifierOutputTarget):
    """The softmax probability of ``category``."""

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return super().__call__(torch.softmax(model_output, dim=-1))


class ClassifierOutputReST(ClassifierOutputTarget):
    """Logit minus cross-entropy: uses both pre- and post-softmax scores (arXiv:2501.06261)."""

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        squeeze = model_output.ndim == 1
        logits = model_output.unsqueeze(0) if squeeze else model_output
        labels = torch.full((logits.shape[0],), self.category, device=logits.device, dtype=torch.long)
        score = logits[:, self.category] - torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        return score[0] if squeeze else score


class BinaryClassifierOutputTarget:
    """For a single-logit binary classifier: the logit for category 1, its negation for 0."""

    def __init__(self, category: int):
        self.category = int(category)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return model_output * (1 if self.category == 1 else -1)


class SoftmaxOutputTarget:
    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model_output, dim=-1)


class RawScoresOutputTarget:
    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return model_output


class SemanticSegmentationTarget:
    """Sum of ``category``'s scores over the pixels in ``mask`` (output ``[num_classes, H, W]``)."""

    def __init__(self, category: int, mask: np.ndarray | torch.Tensor):
        self.category = int(category)
        self.mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(device=model_output.device, dtype=model_output.dtype)
        return (model_output[self.category, :, :] * mask).sum()


class FasterRCNNBoxScoreTarget:
    """For each reference box, the IoU plus score of the best-matching detection of the same label.

    A detection counts when its IoU with the reference box exceeds ``iou_threshold`` and its label
    matches; the target is the sum over the reference boxes (0 when nothing matches).
    """

    def __init__(self, labels: Sequence[int], bounding_boxes, iou_threshold: float = 0.5):
        self.labels = labels
        self.bounding_boxes = bounding_boxes
        self.iou_threshold = iou_threshold

    def __call__(self, model_outputs: dict) -> torch.Tensor:
        boxes = model_outputs["boxes"]
        output = torch.zeros(1, device=boxes.device, dtype=boxes.dtype)
        if len(boxes) == 0:
            return output
        for box, label in zip(self.bounding_boxes, self.labels):
            box = torch.as_tensor(np.asarray(box) if not isinstance(box, torch.Tensor) else box)
            box = box.to(device=boxes.device, dtype=boxes.dtype)[None, :]
            ious = torchvision.ops.box_iou(box, boxes)
            index = ious.argmax()
            if ious[0, index] > self.iou_threshold and model_outputs["labels"][index] == label:
                output = output + ious[0, index] + model_outputs["scores"][index]
        return output


class SimilarityToConceptTarget:
    """Cosine similarity between the output embedding and a concept embedding."""

    def __init__(self, features: torch.Tensor):
        self.features = features

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        features = self.features.to(device=model_output.device, dtype=model_output.dtype)
        return torch.nn.functional.cosine_similarity(model_output, features, dim=0)


class DifferenceFromConceptTarget(SimilarityToConceptTarget):
    """One minus the cosine similarity to a concept embedding."""

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return 1 - super().__call__(model_output)


class FinerWeightedTarget:
    """Weighted difference between a main category and similar comparison categories (Finer-CAM).

    ``sum_k p_k (y_main - alpha * y_k) / (sum_k p_k + 1e-9)`` with ``p_k`` the softmax probabilities.
    """

    def __init__(self, main_category: int, comparison_categories: Sequence[int], alpha: float):
        self.main_category = int(main_category)
        self.comparison_categories = [int(c) for c in comparison_categories]
        self.alpha = alpha

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        main = model_output[..., self.main_category]
        prob = torch.softmax(model_output, dim=-1)
        numerator = 0
        denominator = 0
        for idx in self.comparison_categories:
            weight = prob[..., idx]
            numerator = numerator + weight * (main - self.alpha * model_output[..., idx])
            denominator = denominator + weight
        return numerator / (denominator + 1e-9)
