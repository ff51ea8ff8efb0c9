"""Ultralytics YOLO detectors (YOLOv8, YOLO11, ...) behind torchvision's detector interface.

Optional: needs the ``ultralytics`` package (``pip install 'torchserve-cam[yolo]'``, AGPL-3.0). The
architecture ``ultralytics/<cfg>`` (``ultralytics/yolov8n``, ``ultralytics/yolo11s``) builds the
``DetectionModel`` of the YAML that ships inside the package - offline, no hub - with the config's
number of classes. :class:`YoloDetector` wraps it so that, like a torchvision detector, it returns one
``{"boxes", "labels", "scores"}`` dict per image after class-aware NMS. The detection handler, its
box targets (``FasterRCNNBoxScoreTarget``) and the CAM engine then serve YOLO unchanged, gradient
methods included: a box's score is gathered from the head's output, so its gradient reaches the
layers that produced it.

Weights: :func:`read_checkpoint` turns a local Ultralytics ``.pt`` checkpoint (a pickle, read once at
build time through Ultralytics' own loader) into a plain state dict; archives carry only that, and
the server loads it with ``weights_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["YoloDetector", "build_yolo", "read_checkpoint", "coco80_labels", "require_ultralytics"]

PREFIX = "ultralytics/"


def require_ultralytics() -> Any:
    """The imported ``ultralytics`` package, offline and with its global patches undone.

    Importing Ultralytics replaces ``PIL.Image.open`` (on an unidentified image it tries to install
    ``pi-heif`` instead of raising ``UnidentifiedImageError``, which would turn a 415 into a 500) and
    ``torch.save`` (a retry loop). The serving process keeps the library's own functions; a clear
    error when the optional package is not installed.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no connectivity probes, telemetry or downloads
    os.environ.setdefault("YOLO_VERBOSE", "False")
    try:
        import ultralytics
        from ultralytics.utils import patches
    except ImportError as error:
        raise ImportError(
            "YOLO models need the optional 'ultralytics' package (AGPL-3.0): pip install 'torchserve-cam[yolo]'"
        ) from error
    from PIL import Image

    if Image.open is getattr(patches, "image_open", None):
        Image.open = patches._image_open
    if torch.save is getattr(patches, "torch_save", None):
        torch.save = patches._torch_save
    return ultralytics


class YoloDetector(nn.Module):
    """A YOLO ``DetectionModel`` returning torchvision-style detections.

    ``forward(images [B, 3, H, W] in [0, 1])`` -> per image ``{"boxes": [K, 4] xyxy in input pixels,
    "labels": [K], "scores": [K], "anchors": [K]}`` sorted by score. Post-processing follows
    Ultralytics' ``non_max_suppression`` (one label per anchor, its best class): anchors whose best
    class score exceeds ``box_score_thresh`` go, best first and at most ``pre_nms_top_n`` of them,
    through class-aware NMS at ``box_nms_thresh``; the best ``box_detections_per_img`` are kept.
    Scores and boxes are gathered from the head's output, so they carry gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        box_score_thresh: float = 0.001,
        box_nms_thresh: float = 0.7,
        box_detections_per_img: int = 300,
        pre_nms_top_n: int = 30000,
    ) -> None:
        super().__init__()
        self.model = model
        self.box_score_thresh = float(box_score_thresh)
        self.box_nms_thresh = float(box_nms_thresh)
        self.box_detections_per_img = int(box_detections_per_img)
        self.pre_nms_top_n = int(pre_nms_top_n)

    @property
    def stride(self) -> int:
        """The largest stride of the head: input sizes must be multiples of it."""
        return int(self.model.stride.max())

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        head = self.model.model[-1]
        anchors = getattr(head, "anchors", None)
        if isinstance(anchors, torch.Tensor) and anchors.is_inference() and not torch.is_inference_mode_enabled():
            head.shape = None  # anchors cached by a pass under inference_mode cannot enter autograd: rebuild them
        prediction = self.model(images)
        if isinstance(prediction, (tuple, list)):
            prediction = prediction[0]
        if prediction.dim() != 3 or prediction.shape[1] < 5:
            raise ValueError(
                f"expected the head's [B, 4 + classes, anchors] output, got {tuple(prediction.shape)}: "
                "end-to-end (NMS-free) heads are not supported"
            )
        return [self._detections(rows) for rows in prediction]

    def _detections(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        import torchvision

        xywh, class_scores = rows[:4].T, rows[4:].T  # [A, 4], [A, C]
        best, labels = class_scores.detach().max(dim=1)
        candidates = torch.nonzero(best > self.box_score_thresh).squeeze(1)
        candidates = candidates[torch.argsort(best[candidates], descending=True)][: self.pre_nms_top_n]
        centre, size = xywh[candidates, :2], xywh[candidates, 2:]
        boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
        keep = torchvision.ops.batched_nms(boxes.detach().float(), best[candidates].float(), labels[candidates],
                                           self.box_nms_thresh)[: self.box_detections_per_img]  # fmt: skip
        anchors = candidates[keep]
        return {
            "boxes": boxes[keep],
            "labels": labels[anchors],
            "scores": class_scores[anchors, labels[anchors]],
            "anchors": anchors,
        }


def _config_file(name: str) -> str:
    cfg = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    return cfg if cfg.endswith((".yaml", ".yml")) else f"{cfg}.yaml"


def build_yolo(name: str, num_classes: int, **options: Any) -> YoloDetector:
    """A randomly initialised ``ultralytics/<cfg>`` detector with ``num_classes`` classes, in eval mode.

    ``options`` go to :class:`YoloDetector` (``box_score_thresh``, ``box_nms_thresh``,
    ``box_detections_per_img``, ``pre_nms_top_n``)."""
    require_ultralytics()
    from ultralytics.nn.modules.head import Detect
    from ultralytics.nn.tasks import DetectionModel

    cfg = _config_file(name)
    try:
        model = DetectionModel(cfg, ch=3, nc=int(num_classes), verbose=False)
    except FileNotFoundError:
        raise KeyError(f"unknown architecture {name!r}: Ultralytics has no model config {cfg}") from None
    head = model.model[-1]
    if type(head) is not Detect or getattr(head, "end2end", False):
        raise KeyError(
            f"architecture {name!r}: only YOLO box detectors with an NMS head are supported "
            f"(this one ends in {type(head).__name__})"
        )
    return YoloDetector(model.eval(), **options).eval()


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state dict (``model.*`` keys, float32) of a local checkpoint: an Ultralytics ``.pt`` or a
    plain state dict (of a :class:`YoloDetector` or of its ``DetectionModel``).

    An Ultralytics checkpoint is a pickle, unpickled by Ultralytics' own loader: build archives only
    from checkpoints you trust. Its class names, when it has them, come back under ``"__names__"``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a plain state dict: an Ultralytics checkpoint (a pickle)
        state = None
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        if all(key.startswith("model.model.") for key in state):
            return dict(state)
        return {f"model.{key}": value for key, value in state.items()}
    require_ultralytics()
    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(str(path))
    result: dict[str, Any] = {f"model.{key}": value for key, value in model.float().state_dict().items()}
    config = getattr(model, "yaml", None)
    if isinstance(config, dict) and config.get("yaml_file"):
        result["__config__"] = Path(str(config["yaml_file"])).stem
    names = getattr(model, "names", None)
    if isinstance(names, dict):
        result["__names__"] = [str(names[i]) for i in sorted(names)]
    elif isinstance(names, (list, tuple)):
        result["__names__"] = [str(n) for n in names]
    return result


def coco80_labels() -> list[str]:
    """The 80 COCO class names of Ultralytics' COCO-trained models, from the package's own dataset YAML."""
    require_ultralytics()
    import ultralytics
    import yaml

    path = Path(ultralytics.__file__).parent / "cfg" / "datasets" / "coco.yaml"
    names = yaml.safe_load(path.read_text())["names"]
    return [str(names[i]) for i in sorted(names)]
