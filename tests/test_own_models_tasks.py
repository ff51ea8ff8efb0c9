"""Bring your own model (issue 24), the other tasks: a user's model.py detector and segmenter archived with
TorchServe's own archiver and our detection/segmentation handlers (no config), served by the session TorchServe.
Apart from tests/test_own_models.py so that no module needs more than a few session workers at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import own_models
from tests.helpers.answers import heatmap, post
from tests.helpers.inputs import b64, encode, square_image
from tests.helpers.own_models import OWN_DETECTOR, OWN_SEGMENTER


def _image(height: int, width: int, seed: int = 1) -> np.ndarray:
    return square_image(height, width, (height // 4, width // 4, height // 2, width // 2), seed=seed)


def _user_model(project: Path, class_name: str) -> torch.nn.Module:
    namespace: dict = {}
    exec(compile((project / "model.py").read_text(), "model.py", "exec"), namespace)  # noqa: S102 - the test's own file
    model = namespace[class_name]().eval()
    model.load_state_dict(torch.load(next(project.glob("*.pth")), weights_only=True))
    return model


def _stock_defaults(task: str):
    from handlers.config import PreprocessingConfig
    from handlers.models.model_file import STOCK_PREPROCESSING_BY_TASK

    return PreprocessingConfig.from_dict(STOCK_PREPROCESSING_BY_TASK[task])


def test_model_file_detector_serves_both_endpoints(server) -> None:
    """A user's FasterRCNN subclass in model.py, archived with --handler handlers/tasks/detection.py and no
    config: the detections are the user's model's on the letterboxed input, labelled from index_to_name.json;
    each explained box gets a heatmap at the auto layer (the backbone) with the image's size."""
    from handlers.serving.preprocess import preprocess

    image = _image(240, 320, seed=2)
    answer = post(server, f"predictions/{OWN_DETECTOR}", {"image": b64(encode(image)), "score_threshold": 0.0})
    assert answer.status_code == 200, answer.text
    detections = answer.json()["detections"]
    model = _user_model(own_models.session_detector_project(), "TinyDetector")
    model.transform.min_size, model.transform.max_size = (512,), 512  # what the handler pins
    x, _ = preprocess(torch.from_numpy(image).permute(2, 0, 1).contiguous(), _stock_defaults("detection"))
    with torch.no_grad():
        expected = model(x[None])[0]
    order = expected["scores"].argsort(descending=True)[:3]
    assert len(detections) == len(expected["scores"]) > 0
    assert [(d["label"], d["score"]) for d in detections[:3]] == [
        (own_models.DETECTOR_LABELS[int(expected["labels"][i])], pytest.approx(float(expected["scores"][i]), abs=1e-4))
        for i in order
    ]  # fmt: skip
    explained = post(server, f"explanations/{OWN_DETECTOR}", {"image": b64(encode(image)), "score_threshold": 0.0, "boxes": [0, 1]})
    assert explained.status_code == 200, explained.text
    explanations = explained.json()["explanations"]
    assert [(e["box_index"], e["label"], e["layers"]) for e in explanations] == [
        (i, detections[i]["label"], ["backbone"]) for i in (0, 1)
    ]  # fmt: skip
    assert heatmap(explanations[0]).shape == (240, 320)


def test_model_file_segmenter_serves_both_endpoints(server) -> None:
    """A user's nn.Module returning {"out": logits} (image_segmenter's convention), archived with --handler
    handlers/tasks/segmentation.py and no config: the mask is the user's model's argmax mapped onto the image,
    classes are labelled from index_to_name.json, and the largest non-background class is explained."""
    from handlers.serving.preprocess import preprocess, to_source

    image = _image(120, 160, seed=4)
    explained = post(server, f"explanations/{OWN_SEGMENTER}", encode(image))
    assert explained.status_code == 200, explained.text
    body = explained.json()
    model = _user_model(own_models.session_segmenter_project(), "TinySegmenter")
    x, geometry = preprocess(torch.from_numpy(image).permute(2, 0, 1).contiguous(), _stock_defaults("segmentation"))
    with torch.no_grad():
        expected = to_source(model(x[None])["out"][0], geometry).argmax(0).numpy()
    mask = heatmap({"heatmap": body["mask"]})
    assert mask.shape == (120, 160) and (mask == expected).mean() > 0.99
    assert {c["label"] for c in body["classes"]} == {own_models.SEGMENTER_LABELS[i] for i in np.unique(expected)}
    largest = max((c for c in body["classes"] if c["index"] != 0), key=lambda c: c["pixels"])
    [explanation] = body["explanations"]
    assert (explanation["target"], explanation["label"], explanation["layers"]) == (largest["index"], largest["label"], ["encoder"])
    assert heatmap(explanation).shape == (120, 160)
    plain = post(server, f"predictions/{OWN_SEGMENTER}", encode(image))
    assert plain.status_code == 200 and "explanations" not in plain.json() and plain.json()["mask"] == body["mask"]


