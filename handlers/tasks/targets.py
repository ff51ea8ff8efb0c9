"""Serving-side targets whose subject is only known after the forward pass.

A request asks for "the 2nd best box" or "the class the model sees most of", but which box or which
pixels that is comes out of the same forward pass the CAM runs. These targets decide at call time,
on the one image's output, and then delegate to the cam_engine target of the same name, so one
``cam.run`` serves prediction and explanation. They live here, not in the handler modules, because
TorchServe wants exactly one class per handler module.
"""

from __future__ import annotations

import torch

from cam_engine.targets import ClassifierOutputTarget, FasterRCNNBoxScoreTarget, SemanticSegmentationTarget

__all__ = ["TopClassTarget", "RankedBoxTarget", "PredictedRegionTarget", "ranked_detections", "region_class", "SumTarget",
           "class_of"]  # fmt: skip


class TopClassTarget:
    """The score of the image's own top class: ``output[argmax(output)]`` for a row ``[num_classes]``.

    Lets one batched ``cam.run`` explain "the top class" for some images and given classes for others.
    """

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return model_output.max(dim=-1).values

    @staticmethod
    def resolve(scores: torch.Tensor, row: int) -> int:
        """The class this target names for image ``row`` of the class scores ``[B, C]``: its arg-max."""
        return int(scores[row].reshape(-1).argmax())

    def __repr__(self) -> str:
        return "TopClassTarget()"


def class_of(target: object, scores: object, row: int) -> int | None:
    """The class a classifier target names for image ``row`` of ``scores`` (the batch's class scores): a
    ``ClassifierOutputTarget``'s category, the top class's arg-max (where ``scores`` is a tensor); None for
    any other target. The one place the audit and the Captum attributions learn which class was explained."""
    if isinstance(target, ClassifierOutputTarget):
        return int(target.category)
    if isinstance(target, TopClassTarget) and isinstance(scores, torch.Tensor):
        return target.resolve(scores, row)
    return None


def ranked_detections(output: dict[str, torch.Tensor]) -> torch.Tensor:
    """Indices of one image's detections by decreasing score (stable): ``[N]`` long."""
    return torch.argsort(output["scores"].detach(), descending=True, stable=True)


class RankedBoxTarget:
    """``FasterRCNNBoxScoreTarget`` for the detection of rank ``rank`` (0: the best-scoring box).

    Called on one image's detector output ``{"boxes": [N, 4], "labels": [N], "scores": [N]}``:
    takes that detection's box and label (detached, as the reference does with its NumPy boxes) and
    returns IoU + score of the best-matching detection of the same label. A rank beyond the
    detections gives 0 (kept on the graph, so a batch still differentiates); the handler answers
    such a request with a 4xx.
    """

    def __init__(self, rank: int, iou_threshold: float = 0.5) -> None:
        self.rank = int(rank)
        self.iou_threshold = iou_threshold

    def __call__(self, output: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = output["scores"]
        if self.rank >= scores.shape[0]:
            return scores.sum() * 0
        index = ranked_detections(output)[self.rank]
        target = FasterRCNNBoxScoreTarget(
            [int(output["labels"][index])], [output["boxes"][index].detach()], self.iou_threshold
        )
        return target(output)

    def __repr__(self) -> str:
        return f"RankedBoxTarget({self.rank})"


def region_class(logits: torch.Tensor, background: int | None) -> int:
    """The class covering most pixels of one image's ``[C, H, W]`` logits, ``background`` excluded
    unless nothing else is predicted."""
    counts = torch.bincount(logits.detach().argmax(dim=0).reshape(-1), minlength=logits.shape[0])
    if background is not None and counts.sum() > counts[background]:
        counts = counts.clone()
        counts[background] = -1
    return int(counts.argmax())


class PredictedRegionTarget:
    """``SemanticSegmentationTarget`` of ``category`` over the pixels the model assigns to it.

    Called on one image's logits ``[C, H, W]``: the mask is ``argmax(logits) == category`` of this
    very forward pass. ``category=None`` explains the class with the largest predicted region
    (``background`` excluded, see :func:`region_class`).
    """

    def __init__(self, category: int | None, background: int | None = 0) -> None:
        self.category = category
        self.background = background

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        category = self.category if self.category is not None else region_class(logits, self.background)
        mask = logits.detach().argmax(dim=0) == category
        return SemanticSegmentationTarget(category, mask)(logits)

    def __repr__(self) -> str:
        return f"PredictedRegionTarget({self.category})"


class SumTarget:
    """The sum of an output (a load-time warm-up target for models without classes)."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output.sum()
