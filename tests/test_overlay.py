"""Overlay choices (issue 19, item 3): OpenCV colour maps by name and the blend weight, in cam_engine, the
handler (request options and config defaults) and the CLI."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cam_engine import image as cam_image
from handlers.config import ConfigError, HandlerConfig
from handlers.tasks.classifier import ClassifierHandler
from tests.helpers.fake_context import FakeContext  # noqa: E402
from tests.helpers.inputs import b64, encode  # noqa: E402
from torchserve_cam_cli.main import build_parser

LABELS = [f"class_{i}" for i in range(10)]


def cv2_colours(gray: np.ndarray, name: str) -> np.ndarray:
    """OpenCV's colour map of uint8 ``gray`` as float RGB in [0, 1]."""
    return cv2.applyColorMap(gray, getattr(cv2, f"COLORMAP_{name.upper()}"))[..., ::-1].astype(np.float32) / 255


def expected_overlay(image: np.ndarray, gray: np.ndarray, name: str, alpha: float) -> np.ndarray:
    blended = alpha * cv2_colours(gray, name) + (1 - alpha) * image.astype(np.float32) / 255
    return blended / blended.max() * 255


# ---------------------------------------------------------------------------------------------- cam_engine
def test_names_are_opencvs_ids() -> None:
    assert cam_image.COLORMAPS == {n[len("COLORMAP_"):].lower(): getattr(cv2, n) for n in dir(cv2) if n.startswith("COLORMAP_")}


@pytest.mark.parametrize("name", ["viridis", "inferno", "turbo", "magma", "hot"])
def test_colorize_is_opencvs_table(name: str) -> None:
    cam = torch.linspace(0, 1, 300).reshape(10, 30)
    gray = cam_image.to_uint8(cam).numpy()
    expected = cv2.applyColorMap(gray, cam_image.COLORMAPS[name])[..., ::-1]
    assert np.array_equal(cam_image.colorize(cam, name).numpy(), expected)


@pytest.mark.parametrize("use_rgb", [True, False])
@pytest.mark.parametrize("name", ["viridis", "turbo"])
def test_show_cam_on_image_takes_names_and_ids_like_grad_cam(oracle, name: str, use_rgb: bool) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.random((20, 30, 3), dtype=np.float32)
    mask = rng.random((20, 30), dtype=np.float32)
    expected = oracle.utils.image.show_cam_on_image(rgb, mask, use_rgb=use_rgb, colormap=getattr(cv2, f"COLORMAP_{name.upper()}"), image_weight=0.3)
    by_name = cam_image.show_cam_on_image(rgb, mask, use_rgb=use_rgb, colormap=name, image_weight=0.3)
    by_id = cam_image.show_cam_on_image(rgb, mask, use_rgb, getattr(cv2, f"COLORMAP_{name.upper()}"), 0.3)
    assert np.abs(by_name.astype(int) - expected).max() <= 1  # float32 rounding at .5 only
    assert np.array_equal(by_name, by_id)


def test_unknown_colormap_names_the_choices() -> None:
    with pytest.raises(ValueError, match="colormap must be one of .*viridis.*got 'sepia'"):
        cam_image.overlay(torch.zeros(4, 4, 3, dtype=torch.uint8), torch.zeros(4, 4), colormap="sepia")


# ---------------------------------------------------------------------------------------------- handler
@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> ClassifierHandler:
    directory = tmp_path_factory.mktemp("overlay")
    config = {"handler": {"architecture": "resnet18", "labels": LABELS, "target_layers": ["layer4.-1"],
                          "preprocessing": {"input_size": [64, 64]}, "methods": ["gradcam"],
                          "overlay_colormap": "inferno", "overlay_alpha": 0.7, "overlay_quality": 100}}
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    instance = ClassifierHandler()
    instance.initialize(FakeContext(directory, "overlay"))
    return instance


def call(handler: ClassifierHandler, body: dict) -> tuple[int, dict]:
    context = FakeContext(Path(handler.context.system_properties["model_dir"]), "overlay", [True])
    answer = json.loads(handler.handle([{"body": body}], context)[0])
    return context.status.get(0, (200, ""))[0], answer


def pictures(answer: dict) -> tuple[np.ndarray, np.ndarray]:
    explanation = answer["explanations"][0]
    gray = np.asarray(Image.open(io.BytesIO(base64.b64decode(explanation["heatmap"]["data"]))))
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(explanation["overlay"]["data"]))).convert("RGB"))
    return gray, overlay.astype(np.float32)


def smooth_photo() -> np.ndarray:
    """A 64x64 RGB photo without fine texture (JPEG keeps it within a few levels): ramps and a square."""
    ramp = np.linspace(40, 200, 64, dtype=np.float32)
    photo = np.stack([ramp[None, :].repeat(64, 0), ramp[:, None].repeat(64, 1), np.full((64, 64), 90.0)], axis=-1)
    photo[10:40, 12:44] = (250, 240, 30)
    return photo.astype(np.uint8)


PHOTO = smooth_photo()


@pytest.mark.parametrize(
    ("options", "name", "alpha"),
    [({}, "inferno", 0.7), ({"colormap": "viridis", "alpha": 0.3}, "viridis", 0.3), ({"colormap": "JET", "alpha": 1}, "jet", 1.0)],
)
def test_overlay_uses_the_requested_or_configured_colormap_and_alpha(handler, options, name, alpha) -> None:
    status, answer = call(handler, {"image": b64(encode(PHOTO)), "output": "both", **options})
    assert status == 200, answer
    gray, overlay = pictures(answer)
    error = np.abs(overlay - expected_overlay(PHOTO, gray, name, alpha)).mean()
    assert error < 3.0, error  # JPEG at quality 100
    other = "viridis" if name != "viridis" else "inferno"
    assert np.abs(overlay - expected_overlay(PHOTO, gray, other, alpha)).mean() > 4 * error
    assert np.abs(overlay - expected_overlay(PHOTO, gray, name, 0.5)).mean() > 2 * error  # alpha is not ignored


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"colormap": "sepia"}, "colormap must be one of autumn, bone, jet, .*turbo.*got 'sepia'"),
        ({"colormap": 3}, "colormap must be one of"),
        ({"alpha": 1.5}, r"alpha must be a number in \[0, 1\], got 1.5"),
        ({"alpha": "half"}, r"alpha must be a number in \[0, 1\]"),
    ],
)
def test_bad_overlay_options_are_a_400_naming_the_option(handler, options, message) -> None:
    status, answer = call(handler, {"image": b64(encode(PHOTO)), "output": "overlay", **options})
    assert status == 400 and answer["code"] == 400
    import re

    assert re.search(message, answer["message"]), answer["message"]


def test_config_defaults_are_checked_at_load() -> None:
    base = {"architecture": "resnet18", "num_classes": 2, "target_layers": ["layer4"]}
    assert HandlerConfig.from_dict(base).explanation.overlay_colormap == "jet"
    with pytest.raises(ConfigError, match=r"handler.overlay_colormap: must be one of .*viridis"):
        HandlerConfig.from_dict({**base, "overlay_colormap": "sepia"})
    with pytest.raises(ConfigError, match=r"handler.overlay_alpha: must be a number in \[0, 1\]"):
        HandlerConfig.from_dict({**base, "overlay_alpha": 2})


def test_cli_sends_colormap_and_alpha(tmp_path, monkeypatch) -> None:
    from torchserve_cam_cli import main as cli

    sent = []
    monkeypatch.setattr(cli.Client, "post", lambda self, endpoint, model, image, name, options: sent.append((endpoint, options)) or {})
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(PHOTO))
    out = io.StringIO()
    assert cli.main(["explain", str(photo), "--model", "m", "--no-token", "--colormap", "viridis", "--alpha", "0.25", "--out", str(tmp_path)], out, out) == 0
    assert sent == [("explanations", {"output": "both", "colormap": "viridis", "alpha": 0.25})]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["explain", "x.jpg", "--model", "m", "--alpha", "2"])
