"""A request's ``score_threshold`` below the detector's own floor (torchvision's ``box_score_thresh``)
gets the weaker boxes it asks for; the floor is restored after the batch."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
import yaml

from handlers.tasks.detection import DetectionHandler
from tests.helpers.fake_context import FakeContext
from tests.helpers.inputs import encode, square_image

SECTION = {
    "task": "detection", "architecture": "fasterrcnn_mobilenet_v3_large_fpn", "num_classes": 91,
    "model_options": {"representation_size": 64},  # torchvision's default floor: box_score_thresh 0.05
    "preprocessing": {"input_size": [128, 128], "resize": "letterbox", "mean": [0, 0, 0], "std": [1, 1, 1]},
    "target_layers": ["backbone"], "reshape": "fasterrcnn", "methods": ["eigencam"],
    "detection": {"score_threshold": 0.5, "explain_top": 1},
}  # fmt: skip


def test_a_lower_request_threshold_lowers_the_floor_for_its_batch_only(tmp_path: Path) -> None:
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump({"handler": SECTION}))
    torch.manual_seed(0)
    handler = DetectionHandler()
    handler.initialize(FakeContext(tmp_path, "det"))
    floor = handler.model.roi_heads.score_thresh
    assert floor == 0.05
    image = base64.b64encode(encode(square_image(90, 150, (20, 80, 70, 140)))).decode()
    items = [{"body": {"image": image}}, {"body": {"image": image, "score_threshold": 0.0}}]
    context = FakeContext(tmp_path, "det", [False, True])
    plain, lowered = (json.loads(answer) for answer in handler.handle(items, context))
    assert context.status == {}
    # random weights spread each box's softmax over 91 classes (about 0.011 each), far under 0.5 ...
    assert plain["detections"] == []
    # ... and a request for score_threshold 0 sees boxes under the 0.05 floor, each with its heatmap
    assert lowered["detections"] and min(d["score"] for d in lowered["detections"]) >= 0.0
    assert any(d["score"] < floor for d in lowered["detections"])
    assert len(lowered["explanations"]) == 1 and lowered["explanations"][0]["heatmap"]["format"] == "png"
    assert handler.model.roi_heads.score_thresh == floor  # restored after the batch
