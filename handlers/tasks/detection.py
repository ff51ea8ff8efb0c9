"""TorchServe handler for detectors (torchvision Faster R-CNN and RetinaNet, Ultralytics YOLO): boxes plus a
CAM per box.

JSON options beyond the common ones (see :mod:`handlers.serving.base`):

- ``score_threshold``: in [0, 1], detections below it are not returned (default: the config's);
- ``boxes``: indices into the returned ``detections`` to explain (default: the best
  ``detection.explain_top``), at most ``max_targets``.

Each explained box gets the CAM of ``FasterRCNNBoxScoreTarget`` for that box and label (IoU plus
score of the best-matching detection), at ``backbone`` with the FPN reshape transform. Detections
come from the same forward pass as the CAM. Boxes are ``[x0, y0, x1, y1]`` in the submitted image's
pixels; heatmaps have its size.

The detector normalises and resizes inside (``GeneralizedRCNNTransform``). The handler pins that
transform to the configured ``input_size`` (``min_size``/``max_size``) so it never rescales, which
keeps the FPN maps aligned with the input: use ``resize: letterbox`` (aspect ratio kept), ``mean:
[0, 0, 0]``, ``std: [1, 1, 1]`` and an input size divisible by 32.

YOLO (``architecture: ultralytics/yolov8n``, see :mod:`handlers.models.yolo`) comes out of its
wrapper in the same per-image dict, so everything above holds; it takes [0, 1] RGB as well
(``mean: [0, 0, 0]``, ``std: [1, 1, 1]``) and an input size divisible by its largest stride.

Response::

    {"model": "fasterrcnn_mobilenet_v3_large_fpn", "version": "1.0", "weights": "...",
     "detections": [{"index": 0, "box": [12.5, 40.0, 210.2, 300.7], "class": 1, "label": "person",
                     "score": 0.97}, ...],
     "explanations": [{"box_index": 0, "box": [...], "class": 1, "label": "person", "score": 0.97,
                       "method": "eigencam", "layers": ["backbone"], "heatmap": {...}}]}

This module defines exactly one class, as TorchServe's class-based handler loading requires.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from handlers.config import ConfigError
from handlers.models.loading import LoadedModel
from handlers.serving.base import CamHandler, ParsedRequest, RequestError
from handlers.tasks.registry import TaskResult, get_task
from handlers.tasks.targets import RankedBoxTarget, ranked_detections

__all__ = ["DetectionHandler"]


class DetectionHandler(CamHandler):
    """Detections above a score threshold and one CAM per requested box."""

    task = get_task("detection")
    task_options = task.options

    def load_model(self, model_dir: Path) -> LoadedModel | nn.Module:
        """The detector, its internal transform pinned to the configured input size (no rescaling)."""
        preprocessing = self.config.preprocessing
        if preprocessing.mean != (0.0, 0.0, 0.0) or preprocessing.std != (1.0, 1.0, 1.0):
            raise ConfigError(
                "handler.preprocessing.mean / std: a torchvision detector normalises inside; "
                "set mean: [0, 0, 0] and std: [1, 1, 1]"
            )
        loaded = super().load_model(model_dir)
        model = loaded.model if isinstance(loaded, LoadedModel) else loaded
        height, width = preprocessing.input_size
        stride = getattr(model, "stride", None)
        if isinstance(stride, int):  # a YOLO detector (handlers.models.yolo.YoloDetector)
            if height % stride or width % stride:
                raise ConfigError(
                    f"handler.preprocessing.input_size: {[height, width]} must be divisible by {stride}, "
                    "the detector's largest stride"
                )
            return loaded
        transform = getattr(model, "transform", None)
        if transform is None or not hasattr(transform, "min_size"):
            raise ConfigError(f"handler.architecture: {self.config.architecture} is not a torchvision or YOLO detector")
        divisor = int(getattr(transform, "size_divisible", 32))
        if height % divisor or width % divisor:
            raise ConfigError(
                f"handler.preprocessing.input_size: {[height, width]} must be divisible by {divisor}, "
                "or the detector pads its input and the heatmaps shift"
            )
        transform.min_size = (min(height, width),)
        transform.max_size = max(height, width)
        return loaded

    def warm_up_targets(self) -> list[Any]:
        return [RankedBoxTarget(0)]

    def explain_batch(self, batch: Any, requests: list[ParsedRequest]) -> tuple[Any, list[Any]]:
        """As the base, with a torchvision detector's own score floor (``roi_heads.score_thresh``, the
        builder's ``box_score_thresh``) lowered for this batch to the lowest ``score_threshold`` a request
        asks for, so that a request for weaker boxes gets them (a random-weight detector scores every box
        near 1/num_classes, under the usual 0.05 floor). Each answer still keeps only its own threshold."""
        heads = getattr(self.model, "roi_heads", None)
        floor = getattr(heads, "score_thresh", None)
        wanted = min((float(r.task["score_threshold"]) for r in requests), default=None)
        if not isinstance(floor, float) or wanted is None or wanted >= floor:
            return super().explain_batch(batch, requests)
        heads.score_thresh = wanted
        try:
            return super().explain_batch(batch, requests)
        finally:
            heads.score_thresh = floor

    def parse_task_options(self, request: ParsedRequest, options: Mapping[str, Any]) -> None:
        """``score_threshold`` -> float; ``boxes`` -> list of detection indices (None: the best ones)."""
        detection = self.config.detection
        threshold = options.get("score_threshold", detection.score_threshold)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise RequestError(f"score_threshold must be a number in [0, 1], got {threshold!r}")
        boxes = options.get("boxes")
        if boxes is not None:
            if isinstance(boxes, int) and not isinstance(boxes, bool):
                boxes = [boxes]
            if (
                not isinstance(boxes, list)
                or not boxes
                or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in boxes)
            ):
                raise RequestError(f"boxes must be a non-empty list of detection indices (integers >= 0), got {boxes!r}")
            limit = self.config.explanation.max_targets
            if len(boxes) > limit:
                raise RequestError(f"{len(boxes)} boxes asked, this model explains at most {limit} per request")
            if max(boxes) >= detection.max_detections:
                raise RequestError(
                    f"box index {max(boxes)} is out of range: at most {detection.max_detections} detections are returned"
                )
        request.task = {"score_threshold": float(threshold), "boxes": boxes}

    def targets_for(self, request: ParsedRequest) -> list[Any]:
        ranks = request.task["boxes"]
        if ranks is None:
            ranks = range(min(self.config.detection.explain_top, self.config.explanation.max_targets))
        return [RankedBoxTarget(rank, self.config.detection.iou_threshold) for rank in ranks]

    def _source_box(self, box: list[float], request: ParsedRequest) -> list[float]:
        """A model-input box ``[x0, y0, x1, y1]`` in the submitted image's pixels (clipped to it)."""
        geometry = request.geometry
        sy, sx = geometry.scale
        top, left = geometry.offset
        height, width = geometry.source_size
        x0, y0, x1, y1 = box
        mapped = [(x0 - left) / sx, (y0 - top) / sy, (x1 - left) / sx, (y1 - top) / sy]
        limits = [width, height, width, height]
        return [round(min(max(v, 0.0), limit), 2) for v, limit in zip(mapped, limits)]

    def build_response(
        self, request: ParsedRequest, outputs: Any, row: int, explanations: list[dict[str, Any]] | None
    ) -> TaskResult:
        output = outputs[row]
        order = ranked_detections(output).tolist()
        scores = output["scores"].float().tolist()
        labels = output["labels"].tolist()
        boxes = output["boxes"].float().tolist()
        threshold = request.task["score_threshold"]
        detections = []
        for rank, index in enumerate(order[: self.config.detection.max_detections]):
            if scores[index] < threshold:
                break
            label = int(labels[index])
            detections.append({
                "index": rank,
                "box": self._source_box(boxes[index], request),
                "class": label,
                "label": self.labels[label] if 0 <= label < len(self.labels) else str(label),
                "score": round(scores[index], 6),
            })  # fmt: skip
        if explanations is None:
            return TaskResult(self.task.name, detections)
        requested = request.task["boxes"]
        if requested is not None:
            missing = [b for b in requested if b >= len(detections)]
            if missing:
                raise RequestError(
                    f"box index {missing[0]} is out of range: {len(detections)} detection(s) "
                    f"at score_threshold {threshold}"
                )
            ranks = requested
        else:
            ranks = list(range(min(len(detections), len(explanations))))
        meta = self.explanation_meta(request)
        explained = [
            {"box_index": rank, **{k: v for k, v in detections[rank].items() if k != "index"}, **meta,
             **explanations[position]}
            for position, rank in enumerate(ranks)
        ]  # fmt: skip
        return TaskResult(self.task.name, detections, explained)
