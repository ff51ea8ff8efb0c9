"""One request never breaks its batch or its worker (the session TorchServe, default config.properties).

Also pins what TorchServe itself answers before the handler runs (413 with an empty body over
``max_request_size``, 400 without a token, 500 for a form body it cannot decode), as the README documents.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from PIL import Image

from handlers.serving import limits
from handlers.serving.preprocess import Geometry, to_source
from tests.helpers.answers import post as _post
from tests.helpers.inputs import encode, square_image
from tests.helpers.serving import BATCH_MODEL


def test_an_oversized_answer_fails_alone_and_the_worker_survives(server) -> None:
    """~10 MB of overlays (3 targets of a 2000x2000 noise photo) -> 413 naming the limit; its batch is fine."""
    noise = np.random.default_rng(0).integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
    big = encode(noise, "JPEG", quality=85)
    small = encode(square_image(64, 96, (10, 10, 40, 40)))
    options = {"image": base64.b64encode(big).decode(), "output": "both", "targets": [0, 1, 2]}
    jobs = [("explanations", {"json": options}), ("predictions", {"data": small}), ("explanations", {"data": small})]

    def call(job):
        return _post(server, f"{job[0]}/{BATCH_MODEL}", **job[1])

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(call, jobs))
    refused = answers[0]
    assert refused.status_code == 413, refused.text[:300]
    error = refused.json()
    assert error["type"] == "ResponseTooLarge" and set(error) == {"code", "type", "message"}
    assert "6553500" in error["message"] and "fewer targets" in error["message"]
    assert answers[1].status_code == 200 and answers[1].json()["predictions"]
    assert answers[2].status_code == 200 and answers[2].json()["explanations"]
    assert _post(server, f"predictions/{BATCH_MODEL}", data=small).status_code == 200  # same worker, still up


def test_a_describe_header_on_inference_is_never_a_describe(server) -> None:
    image = encode(square_image(64, 96, (10, 10, 40, 40)))
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _post(server, f"predictions/{BATCH_MODEL}", data=image,
                                                headers={"describe": "True"}), range(4)))  # fmt: skip
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] and "build" not in answer.json()


def test_form_bodies_get_a_4xx_that_asks_for_a_content_type(server) -> None:
    """curl --data-binary without -H sends a form: the handler says what to send instead."""
    form = _post(server, f"predictions/{BATCH_MODEL}", data=b"hello",
                 headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert form.status_code == 415, form.text
    body = form.json()
    assert body["type"] == "UnsupportedMediaType" and "Content-Type" in body["message"] and "-T" in body["message"]
    # a JPEG as a form never reaches the handler: TorchServe's own 500 (README: use -T or a Content-Type)
    jpeg = encode(square_image(64, 96, (10, 10, 40, 40)), "JPEG")
    undecodable = _post(server, f"predictions/{BATCH_MODEL}", data=jpeg,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert undecodable.status_code == 500 and undecodable.json()["type"] == "ErrorDataDecoderException"


def test_torchserve_answers_before_the_handler(server) -> None:
    over = _post(server, f"predictions/{BATCH_MODEL}", data=b"\0" * 6_553_501,
                 headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert over.status_code == 413 and over.content == b""
    no_token = requests.post(f"{server.url()}/predictions/{BATCH_MODEL}", data=b"x", timeout=30,
                             headers={"Authorization": "Bearer wrong"})  # fmt: skip
    assert no_token.status_code == 400 and "Token Authorization failed" in no_token.text


def test_huge_images_get_heatmaps_at_the_capped_size(server) -> None:
    """2600x1800 = 4.68 Mpx > max_heatmap_pixels (4,194,304): the heatmap keeps the aspect, says its source."""
    gradient = np.broadcast_to(np.linspace(0, 255, 2600, dtype=np.uint8)[None, :, None], (1800, 2600, 3))
    answer = _post(server, f"explanations/{BATCH_MODEL}", data=encode(np.ascontiguousarray(gradient), "JPEG"))
    assert answer.status_code == 200, answer.text
    heatmap = answer.json()["explanations"][0]["heatmap"]
    assert heatmap["width"] * heatmap["height"] <= 4_194_304
    assert abs(heatmap["width"] / heatmap["height"] - 2600 / 1800) < 2e-3
    assert heatmap["scaled_from"] == {"width": 2600, "height": 1800}
    picture = Image.open(io.BytesIO(base64.b64decode(heatmap["data"])))
    assert picture.size == (heatmap["width"], heatmap["height"])


def test_capped_geometry_samples_the_same_map_on_a_coarser_grid() -> None:
    """The capped heatmap equals the full-size one averaged down (same continuous map)."""
    geometry = Geometry((400, 600), (224, 336), (0, -56), (224, 224))
    cams = torch_rand((1, 224, 224))
    full = to_source(cams, geometry)[0]
    capped = to_source(cams, limits.capped_geometry(geometry, 100 * 150))[0]
    assert tuple(capped.shape) == (100, 150)
    pooled = full.reshape(100, 4, 150, 4).mean(dim=(1, 3))
    assert float((capped - pooled).abs().max()) < 0.05


def torch_rand(shape):
    import torch

    generator = torch.Generator().manual_seed(0)
    smooth = torch.rand((1, 1, 14, 14), generator=generator)
    return torch.nn.functional.interpolate(smooth, size=shape[-2:], mode="bilinear", align_corners=False)[0]


def test_the_response_limit_comes_from_the_frontend_command_line(tmp_path, monkeypatch) -> None:
    config = tmp_path / "ts.properties"
    config.write_text("inference_address=http://127.0.0.1:1\nmax_response_size=123456\n")
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                             "org.pytorch.serve.ModelServer", "-f", str(config)])  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while b"ModelServer" not in open(f"/proc/{fake.pid}/cmdline", "rb").read() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert limits.frontend_config(fake.pid) == config
        assert limits.max_response_size(pid=fake.pid) == (123456, f"max_response_size in {config}")
        assert limits.max_response_size(override=2048, pid=fake.pid) == (2048, "handler.max_response_size")
        monkeypatch.setenv("TS_MAX_RESPONSE_SIZE", "999")  # ignored unless the config enables env vars
        assert limits.max_response_size(pid=fake.pid)[0] == 123456
        config.write_text("enable_envvars_config=true\n")
        assert limits.max_response_size(pid=fake.pid) == (999, "TS_MAX_RESPONSE_SIZE")
    finally:
        fake.kill()
        fake.wait()
    assert limits.max_response_size(pid=os.getpid())[0] == limits.DEFAULT_MAX_RESPONSE_SIZE
