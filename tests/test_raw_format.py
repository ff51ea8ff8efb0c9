"""Raw attribution data (issue 19, item 2): ``heatmap_format`` float16/npy at the input grid or the photo's
size, compared with cam_engine called directly on the same model and input; bounded by the response limit."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import cam_engine
from cam_engine.targets import ClassifierOutputTarget
from handlers.serving.codec import decode_image, encode_raw
from handlers.serving.preprocess import preprocess
from handlers.tasks.classifier import ClassifierHandler
from tests.helpers.fake_context import FakeContext  # noqa: E402
from tests.helpers.inputs import b64, encode, square_image  # noqa: E402

LABELS = [f"class_{i}" for i in range(10)]
PHOTO = square_image(80, 100, (10, 20, 50, 70))  # 100x80: stretched to the 64x64 input
TARGET = 3


def make_handler(directory: Path, **extra) -> ClassifierHandler:
    config = {"handler": {"architecture": "resnet18", "labels": LABELS, "target_layers": ["layer4.-1"],
                          "preprocessing": {"input_size": [64, 64]}, "methods": ["gradcam", "layercam"], **extra}}
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    instance = ClassifierHandler()
    instance.initialize(FakeContext(directory, "raw"))
    return instance


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> ClassifierHandler:
    return make_handler(tmp_path_factory.mktemp("raw"))


def call(handler: ClassifierHandler, body: dict) -> tuple[int, dict]:
    context = FakeContext(Path(handler.context.system_properties["model_dir"]), "raw", [True])
    answer = json.loads(handler.handle([{"body": body}], context)[0])
    return context.status.get(0, (200, ""))[0], answer


def decode(heatmap: dict) -> np.ndarray:
    data = base64.b64decode(heatmap["data"])
    if heatmap["format"] == "npy":
        array = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        assert heatmap["byte_order"] == "little"
        array = np.frombuffer(data, "<f2").reshape(heatmap["shape"])
    assert str(array.dtype) == heatmap["dtype"] and list(array.shape) == heatmap["shape"]
    assert heatmap["shape"] == [heatmap["height"], heatmap["width"]]
    return array.astype(np.float32)


def direct(handler: ClassifierHandler, method: str) -> torch.Tensor:
    """cam_engine on the handler's model and the same preprocessed input: ``[64, 64]`` in [0, 1]."""
    x, _ = preprocess(decode_image(encode(PHOTO), 10**8), handler.config.preprocessing)
    layer = cam_engine.resolve_layer(handler.model, "layer4.-1")
    cam = cam_engine.create(method, handler.model, [layer])
    return cam.run(x[None], [[ClassifierOutputTarget(TARGET)]]).cams[0]


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_float16_at_the_input_grid_equals_cam_engine(handler, method) -> None:
    status, answer = call(handler, {"image": b64(encode(PHOTO)), "method": method, "targets": [TARGET],
                                    "heatmap_format": "float16", "heatmap_size": "input"})
    assert status == 200, answer
    heatmap = answer["explanations"][0]["heatmap"]
    assert (heatmap["format"], heatmap["dtype"], heatmap["shape"], heatmap["grid"]) == ("float16", "float16", [64, 64], "input")
    values = decode(heatmap)
    expected = direct(handler, method).numpy()
    assert expected.max() == pytest.approx(1, abs=1e-6) and expected.std() > 0.05
    np.testing.assert_allclose(values, expected, rtol=2**-10, atol=2e-4)  # float16: 11 significant bits


def test_npy_at_the_photo_size_is_the_input_map_resized(handler) -> None:
    status, answer = call(handler, {"image": b64(encode(PHOTO)), "targets": [TARGET], "heatmap_format": "npy"})
    assert status == 200, answer
    heatmap = answer["explanations"][0]["heatmap"]
    assert (heatmap["format"], heatmap["dtype"], heatmap["width"], heatmap["height"]) == ("npy", "float32", 100, 80)
    values = decode(heatmap)
    expected = F.interpolate(direct(handler, "gradcam")[None, None], size=(80, 100), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(values, expected.numpy(), atol=1e-5)


def test_png_and_raw_agree_and_overlay_still_comes(handler) -> None:
    body = {"image": b64(encode(PHOTO)), "targets": [TARGET], "output": "both"}
    _, png = call(handler, body)
    status, raw = call(handler, {**body, "heatmap_format": "npy"})
    assert status == 200
    from PIL import Image

    gray = np.asarray(Image.open(io.BytesIO(base64.b64decode(png["explanations"][0]["heatmap"]["data"]))))
    values = decode(raw["explanations"][0]["heatmap"])
    assert np.abs(np.round(values * 255) - gray).max() <= 1
    assert raw["explanations"][0]["overlay"]["format"] == "jpeg"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"heatmap_format": "float64"}, "heatmap_format must be one of png, float16, npy, got 'float64'"),
        ({"heatmap_size": "huge", "heatmap_format": "npy"}, "heatmap_size must be one of image, input, got 'huge'"),
        ({"heatmap_size": "input"}, "heatmap_size 'input' needs heatmap_format 'float16' or 'npy'"),
    ],
)
def test_bad_raw_options_are_a_400(handler, options, message) -> None:
    status, answer = call(handler, {"image": b64(encode(PHOTO)), **options})
    assert status == 400 and message in answer["message"], answer


def test_raw_answers_are_bounded_by_the_response_limit(tmp_path) -> None:
    small = make_handler(tmp_path, max_response_size=20_000)
    body = {"image": b64(encode(PHOTO)), "targets": [TARGET]}
    status, answer = call(small, {**body, "heatmap_format": "float16", "heatmap_size": "input"})
    assert status == 200, answer  # 64 * 64 * 2 B = 8 KB, ~11 KB base64
    status, answer = call(small, {**body, "heatmap_format": "npy"})  # 100 * 80 * 4 B = 32 KB
    assert status == 413 and answer["type"] == "ResponseTooLarge" and "20000 bytes" in answer["message"]


def test_encode_raw_float16_rounds_like_numpy() -> None:
    values = np.array([[0.1, -2.5e-3], [1.0, 3.0e4]], dtype=np.float32)
    data, meta = encode_raw(values, "float16")
    assert meta == {"dtype": "float16", "byte_order": "little", "shape": [2, 2]}
    assert np.array_equal(np.frombuffer(data, "<f2").reshape(2, 2), values.astype(np.float16))
