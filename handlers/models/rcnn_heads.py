"""Faster R-CNN box heads whose gradient runs through the detections only, not all 1000 proposals.

A box's score and coordinates come from one proposal's row of the box head. torchvision's
``RoIHeads`` runs RoIAlign and the box head for every proposal (1000 per image at inference), so the
backward pass of a box's CAM runs RoIAlign's backward (a scatter over all proposals, channels and
sampling points) and the box head's for all 1000 rows although one row carries gradient: on CPU
that is most of a detector's gradient CAM.

:class:`DetectionGradientRoIHeads` (a ``RoIHeads`` whose class the detector builder swaps in:
same parameters, buffers and state-dict keys) computes all proposals without a graph, exactly as
torchvision does, finds the (proposal, class) that produced each returned detection, and recomputes
those rows alone with a graph. The returned values are torchvision's own, bit for bit; their
gradients come from the recomputed rows. Without gradients (predictions, gradient-free CAMs), in
training, or with mask/keypoint heads it is torchvision's forward unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

__all__ = ["DetectionGradientRoIHeads"]


class DetectionGradientRoIHeads(RoIHeads):
    """``RoIHeads`` with a graph through the returned detections' rows only (see the module docstring)."""

    def forward(self, features, proposals, image_shapes, targets=None):  # noqa: D102 - RoIHeads' signature
        if self.training or self.has_mask() or self.has_keypoint() or not torch.is_grad_enabled():
            return super().forward(features, proposals, image_shapes, targets)
        with torch.no_grad():
            box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
            class_logits, box_regression = self.box_predictor(box_features)
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
            counts = [len(p) for p in proposals]
            all_scores = F.softmax(class_logits, -1).split(counts)
            all_regression = box_regression.split(counts)
            rows = [
                self._source_rows(image_boxes, image_scores, image_labels, image_all, image_regression, image_proposals, shape)
                for image_boxes, image_scores, image_labels, image_all, image_regression, image_proposals, shape
                in zip(boxes, scores, labels, all_scores, all_regression, proposals, image_shapes)
            ]  # fmt: skip
        # An image without detections still answers on the graph (empty tensors with a grad_fn, as
        # torchvision's do), so a target on it differentiates to a zero CAM instead of failing.
        attached = sum(level.sum() for level in features.values()) * 0
        if not any(len(image_rows) for image_rows in rows):
            return [{"boxes": b + attached, "labels": la, "scores": sc + attached}
                    for b, sc, la in zip(boxes, scores, labels)], {}  # fmt: skip
        selected = [image_proposals[image_rows] for image_proposals, image_rows in zip(proposals, rows)]
        features_selected = self.box_head(self.box_roi_pool(features, selected, image_shapes))
        class_logits, box_regression = self.box_predictor(features_selected)
        decoded = self.box_coder.decode(box_regression, selected)  # [M, C, 4]
        probabilities = F.softmax(class_logits, -1)
        result = []
        start = 0
        for image_boxes, image_scores, image_labels, image_rows, shape in zip(boxes, scores, labels, rows, image_shapes):
            count = len(image_rows)
            if count == 0:  # this image has no detection
                result.append({"boxes": image_boxes + attached, "labels": image_labels, "scores": image_scores + attached})
                continue
            index = torch.arange(count, device=image_labels.device)
            image_decoded = box_ops.clip_boxes_to_image(decoded[start : start + count], shape)[index, image_labels]
            image_probabilities = probabilities[start : start + count][index, image_labels]
            start += count
            # torchvision's values, with the gradient of the recomputed rows
            result.append({
                "boxes": image_boxes + (image_decoded - image_decoded.detach()),
                "labels": image_labels,
                "scores": image_scores + (image_probabilities - image_probabilities.detach()),
            })  # fmt: skip
        return result, {}

    def _source_rows(
        self,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        labels: torch.Tensor,
        all_scores: torch.Tensor,
        regression: torch.Tensor,
        proposals: torch.Tensor,
        image_shape: tuple[int, int],
    ) -> torch.Tensor:
        """The proposal row of each detection ``[K]``: the row whose class score and decoded, clipped
        box equal the detection's (postprocess_detections computed them from the same tensors)."""
        rows = torch.empty(len(labels), dtype=torch.long, device=labels.device)
        for k, (label, score) in enumerate(zip(labels.tolist(), scores)):
            candidates = torch.nonzero(all_scores[:, label] == score).squeeze(1)
            if len(candidates) > 1:
                decoded = self.box_coder.decode(regression[candidates], [proposals[candidates]])[:, label]
                decoded = box_ops.clip_boxes_to_image(decoded, image_shape)
                exact = (decoded == boxes[k]).all(dim=1)
                candidates = candidates[exact] if exact.any() else candidates
            if len(candidates) == 0:  # not expected: fall back to the closest score of that class
                candidates = (all_scores[:, label] - score).abs().argmin().reshape(1)
            rows[k] = candidates[0]
        return rows
