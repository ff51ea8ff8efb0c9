"""Explanation latency against prediction latency, per task, through the real handlers in-process.

    python bench/bench_tasks.py [--rounds 7] [--threads 1]

For each task the shipped config's architecture is built with random weights (timings do not depend
on the weights; a random detector gets ``box_score_thresh: 0`` so there are boxes to explain) and
driven through its handler's ``handle()`` exactly as TorchServe calls it, with a 480x640 PNG:

- detection: Faster R-CNN MobileNetV3-FPN at 320x320 (letterbox), EigenCAM (the config default) and
  GradCAM of ``FasterRCNNBoxScoreTarget`` at ``backbone`` for the top 1 and top 3 boxes, and the top 3
  again with torchvision's own ``RoIHeads`` (every proposal's row in the graph) for comparison;
- detection, YOLO (when the optional ``ultralytics`` is installed): YOLOv8n at 640x640 (the shipped
  config), EigenCAM and GradCAM of the box score at the three maps its head reads;
- segmentation: DeepLabV3 MobileNetV3 at 320x320, GradCAM of ``SemanticSegmentationTarget`` at
  ``backbone.16`` (mask PNG in both answers);
- embedding: ResNet-50 without its head at 224x224, GradCAM of ``SimilarityToConceptTarget`` at
  ``layer4.-1`` against a stored concept.

Predictions and explanations are interleaved, one request at a time; the medians and their ratio are
printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from handlers.tasks.detection import DetectionHandler  # noqa: E402
from handlers.tasks.embedding import EmbeddingHandler  # noqa: E402
from handlers.tasks.segmentation import SegmentationHandler  # noqa: E402


class Context:
    """Just enough of TorchServe's Context: properties, the per-request explain header."""

    def __init__(self, model_dir: Path, config: dict[str, Any], explain: bool = False) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 1}
        self.model_name = "bench"
        self.manifest = {"model": {"modelVersion": "1.0"}}
        self.model_yaml_config = config
        self.metrics = None
        self.explain = explain

    def get_request_header(self, idx: int, key: str) -> str | None:
        return str(self.explain) if key == "explain" else None

    def set_response_status(self, code: int, phrase: str, idx: int = 0) -> None:
        raise RuntimeError(f"request refused: {code} {phrase}")

    def set_response_content_type(self, idx: int, value: str) -> None:
        pass


def _png(height: int, width: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(40, 120, size=(height, width, 3), dtype=np.uint8)
    image[100:300, 200:420] = (230, 200, 40)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _handler(cls: type, handler: dict[str, Any], files: dict[str, bytes] | None = None):
    directory = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    for name, data in (files or {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    config = {"handler": handler}
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    instance = cls()
    instance.initialize(Context(directory, config))
    return instance, directory, config


def _time(handler, directory: Path, config: dict[str, Any], body: Any, explain: bool) -> tuple[float, int]:
    context = Context(directory, config, explain)
    start = time.perf_counter()
    (answer,) = handler.handle([{"body": body}], context)
    elapsed = (time.perf_counter() - start) * 1000
    parsed = json.loads(answer)
    if "code" in parsed:
        raise RuntimeError(parsed)
    return elapsed, len(answer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed requests per endpoint (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = _png(480, 640)
    common = {"max_targets": 5, "eigen_smooth": False, "aug_smooth": False}
    detector = _handler(DetectionHandler, {
        **common, "task": "detection", "architecture": "fasterrcnn_mobilenet_v3_large_fpn", "num_classes": 91,
        "model_options": {"box_score_thresh": 0.0},
        "preprocessing": {"input_size": [320, 320], "resize": "letterbox", "mean": [0, 0, 0], "std": [1, 1, 1]},
        "target_layers": ["backbone"], "reshape": "fasterrcnn", "methods": ["eigencam", "gradcam"],
        "detection": {"score_threshold": 0.0, "max_detections": 20, "explain_top": 1},
    })  # fmt: skip
    # The same detector with torchvision's own RoIHeads: every proposal's row in the box's graph.
    from torchvision.models.detection.roi_heads import RoIHeads

    detector_all_rows = _handler(DetectionHandler, detector[2]["handler"])
    detector_all_rows[0].model.roi_heads.__class__ = RoIHeads
    segmenter = _handler(SegmentationHandler, {
        **common, "task": "segmentation", "architecture": "deeplabv3_mobilenet_v3_large", "num_classes": 21,
        "preprocessing": {"input_size": [320, 320]}, "target_layers": ["backbone.16"], "methods": ["gradcam"],
    })  # fmt: skip
    embedder = _handler(EmbeddingHandler, {
        **common, "task": "embedding", "architecture": "resnet50_embedding",
        "preprocessing": {"input_size": [224, 224]}, "target_layers": ["layer4.-1"], "methods": ["gradcam"],
        "embedding": {"concepts": {"thing": ["concepts/thing.png"]}},
    }, files={"concepts/thing.png": _png(480, 640, seed=1)})  # fmt: skip
    b64 = base64.b64encode(image).decode("ascii")
    cases = [
        ("detection, EigenCAM, top box", detector, {"image": b64}),
        ("detection, GradCAM, top box", detector, {"image": b64, "method": "gradcam"}),
        ("detection, GradCAM, top 3 boxes", detector, {"image": b64, "method": "gradcam", "boxes": [0, 1, 2]}),
        ("detection, GradCAM, top 3 boxes, torchvision RoIHeads (all 1000 proposals in the graph)",
         detector_all_rows, {"image": b64, "method": "gradcam", "boxes": [0, 1, 2]}),
    ]
    if importlib.util.find_spec("ultralytics") is not None:
        shipped = yaml.safe_load((REPO / "model_store" / "configs" / "yolov8n.yaml").read_text())["handler"]
        yolo = _handler(DetectionHandler, {
            **shipped, **common, "weights": None, "labels": None, "num_classes": 80,
            "model_options": {**shipped["model_options"], "box_score_thresh": 0.0},
            "detection": {**shipped["detection"], "score_threshold": 0.0, "explain_top": 1},
        })  # fmt: skip
        cases += [
            ("YOLOv8n, EigenCAM, top box", yolo, {"image": b64}),
            ("YOLOv8n, GradCAM, top box", yolo, {"image": b64, "method": "gradcam"}),
            ("YOLOv8n, GradCAM, top 3 boxes", yolo, {"image": b64, "method": "gradcam", "boxes": [0, 1, 2]}),
        ]
    else:
        print("(YOLO rows skipped: the optional 'ultralytics' package is not installed)")
    cases += [
        ("segmentation, GradCAM, largest class", segmenter, {"image": b64}),
        ("embedding, GradCAM, similarity to a concept", embedder, {"image": b64, "concept": "thing"}),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), 640x480 PNG, {args.rounds} rounds\n")
    print("| task | prediction ms (median) | explanation ms (median) | ratio | explanation bytes |")
    print("|---|---:|---:|---:|---:|")
    for name, (handler, directory, config), body in cases:
        plain = {k: v for k, v in body.items() if k not in ("method", "boxes")}
        _time(handler, directory, config, plain, False)
        _time(handler, directory, config, body, True)
        predictions, explanations, size = [], [], 0
        for _ in range(args.rounds):
            predictions.append(_time(handler, directory, config, plain, False)[0])
            elapsed, size = _time(handler, directory, config, body, True)
            explanations.append(elapsed)
        p, e = statistics.median(predictions), statistics.median(explanations)
        print(f"| {name} | {p:.1f} | {e:.1f} | {e / p:.2f}x | {size:,} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
