"""The classifier handler in-process (no server): schema, batching, per-request errors, sizes."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from handlers.tasks.classifier import ClassifierHandler
from tests.helpers.answers import decode_png  # noqa: E402
from tests.helpers.fake_context import FakeContext  # noqa: E402
from tests.helpers.inputs import b64, bad_payloads, encode, square_image  # noqa: E402

NUM_CLASSES = 10
LABELS = [f"class_{i}" for i in range(NUM_CLASSES)]


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> ClassifierHandler:
    directory = tmp_path_factory.mktemp("resnet18")
    config = {
        "batchSize": 8,
        "handler": {
            "architecture": "resnet18",
            "labels": LABELS,
            "target_layers": ["layer4.-1"],
            "methods": ["gradcam", "layercam", "eigencam"],
            "max_targets": 5,
            "top_k": 3,
            "aug_smooth": True,
            "eigen_smooth": False,
        },
    }
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    instance = ClassifierHandler()
    instance.initialize(FakeContext(directory, "tiny"))
    return instance


def call(handler: ClassifierHandler, bodies: list, explain: list[bool]) -> tuple[list[dict], FakeContext]:
    context = FakeContext(Path(handler.context.system_properties["model_dir"]), "tiny", explain)
    items = [{"body": body if isinstance(body, dict) else bytearray(body)} for body in bodies]
    return [json.loads(r) for r in handler.handle(items, context)], context


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_prediction_schema(handler: ClassifierHandler, fmt: str) -> None:
    image = encode(square_image(120, 200, (10, 10, 60, 60)), fmt)
    (response,), context = call(handler, [image], [False])
    assert context.status == {}
    assert set(response) == {"model", "version", "weights", "predictions"}
    scores = [p["score"] for p in response["predictions"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert all(p["label"] == LABELS[p["index"]] for p in response["predictions"])


def test_explanation_of_top_class_is_aligned_with_the_submitted_image(handler: ClassifierHandler) -> None:
    image = encode(square_image(150, 420, (20, 300, 90, 380)))
    (response,), _ = call(handler, [image], [True])
    (explanation,) = response["explanations"]
    assert explanation["target"] == response["predictions"][0]["index"]
    assert explanation["method"] == "gradcam" and explanation["layers"] == ["layer4.-1"]
    heatmap = explanation["heatmap"]
    assert (heatmap["width"], heatmap["height"]) == (420, 150)
    assert decode_png(heatmap["data"]).shape == (150, 420)


def test_requested_targets_labels_and_overlay(handler: ClassifierHandler) -> None:
    image = encode(square_image(100, 100, (10, 10, 50, 50)))
    body = {"image": b64(image), "targets": [3, "class_7"], "output": "both", "top_k": 2, "method": "LayerCAM"}
    (response,), _ = call(handler, [body], [True])
    assert len(response["predictions"]) == 2
    assert [e["target"] for e in response["explanations"]] == [3, 7]
    assert [e["label"] for e in response["explanations"]] == ["class_3", "class_7"]
    for explanation in response["explanations"]:
        assert explanation["method"] == "layercam"
        overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay"]["data"])))
        assert overlay.format == "JPEG" and overlay.size == (100, 100) and overlay.mode == "RGB"
    # two different classes give two different maps
    first, second = (decode_png(e["heatmap"]["data"]).astype(int) for e in response["explanations"])
    assert np.abs(first - second).max() > 10


def test_mixed_batch_matches_single_requests(handler: ClassifierHandler) -> None:
    """A batch of predictions and explanations: one forward pass, same numbers as requests alone."""
    images = [encode(square_image(90 + 10 * i, 130, (5, 5 + 10 * i, 40, 60 + 10 * i), seed=i)) for i in range(4)]
    bodies = [images[0], images[1], {"image": b64(images[2]), "explain": True}, images[3]]
    explain = [True, False, False, True]  # request 2 asks through JSON on /predictions
    batched, context = call(handler, bodies, explain)
    assert context.status == {}
    assert ["explanations" in r for r in batched] == [True, False, True, True]
    for body, flag, together in zip(bodies, explain, batched):
        (alone,), _ = call(handler, [body], [flag])
        assert [p["index"] for p in alone["predictions"]] == [p["index"] for p in together["predictions"]]
        for a, b in zip(alone["predictions"], together["predictions"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        if "explanations" in alone:
            a = decode_png(alone["explanations"][0]["heatmap"]["data"]).astype(int)
            b = decode_png(together["explanations"][0]["heatmap"]["data"]).astype(int)
            assert np.abs(a - b).max() <= 2


def test_each_bad_input_gets_its_own_error_while_the_batch_succeeds(handler: ClassifierHandler) -> None:
    good = encode(square_image(64, 64, (10, 10, 30, 30)))
    bad = bad_payloads(good, NUM_CLASSES)
    bodies, explain = [good], [True]
    for body, _ in bad.values():
        bodies.append(body)
        explain.append(True)
    bodies.append(good)
    explain.append(False)
    responses, context = call(handler, bodies, explain)
    assert 0 not in context.status and len(bodies) - 1 not in context.status
    assert "explanations" in responses[0] and "predictions" in responses[-1]
    for position, (name, (_, code)) in enumerate(bad.items(), start=1):
        assert context.status.get(position, (None,))[0] == code, (name, responses[position])
        assert responses[position]["code"] == code and responses[position]["type"] and responses[position]["message"]
        assert context.content_types[position] == "application/json"


def test_options_a_model_does_not_allow(handler: ClassifierHandler) -> None:
    good = encode(square_image(64, 64, (10, 10, 30, 30)))
    responses, context = call(handler, [{"image": b64(good), "eigen_smooth": True}, {"image": b64(good), "method": "fem"}], [True, True])
    assert context.status[0][0] == 400 and "eigen_smooth" in responses[0]["message"]
    assert context.status[1][0] == 400 and "gradcam" in responses[1]["message"]  # lists the allowed ones


def test_top_k_is_bounded_by_the_model_s_classes(handler: ClassifierHandler) -> None:
    good = b64(encode(square_image(64, 64, (10, 10, 30, 30))))
    responses, context = call(handler, [{"image": good, "top_k": NUM_CLASSES}, {"image": good, "top_k": NUM_CLASSES + 1}], [False, False])
    assert len(responses[0]["predictions"]) == NUM_CLASSES
    assert context.status[1][0] == 400 and f"top_k {NUM_CLASSES + 1} is over this model's limit classes = {NUM_CLASSES}" in responses[1]["message"]


def test_heatmap_of_a_224_image_is_small(handler: ClassifierHandler) -> None:
    image = encode(square_image(224, 224, (30, 30, 120, 120)))
    (response,), _ = call(handler, [image], [True])
    size = len(base64.b64decode(response["explanations"][0]["heatmap"]["data"]))
    assert size <= 16 * 1024, size


def test_aug_smooth_and_other_methods_share_a_batch(handler: ClassifierHandler) -> None:
    """aug_smooth and a second method run on their own images; predictions still come from one batch."""
    images = [encode(square_image(96, 96, (10 + 10 * i, 10, 50 + 10 * i, 50), seed=i)) for i in range(4)]
    bodies = [
        {"image": b64(images[0]), "aug_smooth": True},
        images[1],
        {"image": b64(images[2]), "method": "eigencam"},
        images[3],
    ]
    explain = [True, True, True, False]
    batched, context = call(handler, bodies, explain)
    assert context.status == {}
    assert [r["explanations"][0]["method"] for r in batched[:3]] == ["gradcam", "gradcam", "eigencam"]
    assert "explanations" not in batched[3]
    for body, flag, together in zip(bodies, explain, batched):
        (alone,), _ = call(handler, [body], [flag])
        for a, b in zip(alone["predictions"], together["predictions"]):
            assert a["index"] == b["index"] and a["score"] == pytest.approx(b["score"], abs=1e-4)
        if flag:
            a = decode_png(alone["explanations"][0]["heatmap"]["data"]).astype(int)
            b = decode_png(together["explanations"][0]["heatmap"]["data"]).astype(int)
            assert np.abs(a - b).max() <= 2
    # aug_smooth really changes the map (it averages flipped and brightness-scaled passes)
    (plain,), _ = call(handler, [images[0]], [True])
    smoothed = decode_png(batched[0]["explanations"][0]["heatmap"]["data"]).astype(int)
    assert np.abs(decode_png(plain["explanations"][0]["heatmap"]["data"]).astype(int) - smoothed).max() > 5
