"""Issue 25's decoding and protocol triggers against the session's real TorchServe: each answered as specified,
with its batch-mates and the worker unharmed (TorchServe alone answered every one of them differently)."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image
from skimage import data as skimage_data

from tests.helpers.answers import post as _post
from tests.helpers.images import frames, jpeg_header_only, photo, save
from tests.helpers.serving import BATCH_MODEL, DEFAULT_MODEL


def _worker(server, model: str) -> dict:
    answer = requests.get(f"{server.url('management')}/models/{model}", headers=server.headers("management"), timeout=30)
    (worker,) = answer.json()[0]["workers"]
    return worker


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_sixteen_fake_6300x6300_headers_are_refused_before_decoding_with_rss_flat(server):
    worker = _worker(server, BATCH_MODEL)
    before = _rss_mb(worker["pid"])
    fake = _b64(jpeg_header_only(6300, 6300))
    start = time.monotonic()
    answer = _post(server, f"v1/models/{BATCH_MODEL}:predict", json={"instances": [{"data": fake}] * 16})
    elapsed = time.monotonic() - start
    assert answer.status_code == 413, answer.text
    assert {p["type"] for p in answer.json()["predictions"]} == {"TooManyPixels"}
    assert elapsed < 5, elapsed  # TorchServe alone: 17.7 s and +2.3 GB
    assert _rss_mb(worker["pid"]) - before < 100
    alone = _post(server, f"predictions/{BATCH_MODEL}", data=jpeg_header_only(300, 200), headers={"Content-Type": "image/jpeg"})
    assert alone.status_code == 400 and alone.json()["type"] == "InvalidImage" and "truncated" in alone.json()["message"]


def test_formats_outside_the_allowlist_and_animations_are_refused(server):
    png = save(photo(), "PNG")
    bodies = {"eps": save(photo(), "EPS"), "tga": save(photo(), "TGA"), "gif": frames("GIF"), "png": png}

    def send(raw: bytes) -> requests.Response:
        return _post(server, f"predictions/{BATCH_MODEL}", data=raw, headers={"Content-Type": "application/octet-stream"})

    with ThreadPoolExecutor(len(bodies)) as pool:  # one batch (300 ms window): the good PNG answers 200
        answers = dict(zip(bodies, pool.map(send, bodies.values())))
    for name in ("eps", "tga"):  # EPS: refused at open, so Ghostscript is never looked for (TorchServe alone: 400)
        assert answers[name].status_code == 415 and answers[name].json()["type"] == "UnsupportedMediaType", answers[name].text
    assert answers["gif"].status_code == 400 and answers["gif"].json()["type"] == "MultiFrameImage"
    assert answers["png"].status_code == 200 and len(answers["png"].json()["predictions"]) == 3


def test_a_16_bit_grayscale_photo_gets_the_top_class_of_its_8_bit_copy(server):
    gray = np.asarray(Image.fromarray(skimage_data.chelsea()).convert("L"))
    eight = save(gray, "PNG")
    sixteen = save(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")
    answers = [_post(server, f"predictions/{DEFAULT_MODEL}", data=raw, headers={"Content-Type": "image/png"}) for raw in (eight, sixteen)]
    assert [a.status_code for a in answers] == [200, 200]
    first, second = (a.json()["predictions"] for a in answers)
    assert second == first and first[0]["label"] in ("Egyptian cat", "tabby", "tiger cat")


def test_kserve_details_shape_parameters_base64_forms_bom_and_missing_inputs(server):
    raw = save(photo(), "PNG")
    standard = _b64(raw)
    urlsafe_unpadded = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    mime = base64.encodebytes(raw).decode()
    v1 = _post(server, f"v1/models/{BATCH_MODEL}:predict",
               json={"instances": [{"data": standard}, {"data": urlsafe_unpadded}, {"data": mime, "top_k": 2}],
                     "parameters": {"top_k": 1}})  # fmt: skip
    assert v1.status_code == 200, v1.text
    assert [len(p["predictions"]) for p in v1.json()["predictions"]] == [1, 1, 2]
    shape = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [standard] * 3}]}
    wrong = _post(server, f"v2/models/{BATCH_MODEL}/infer", json=shape)
    assert wrong.status_code == 400 and "shape [1] holds 1 element(s)" in wrong.json()["message"]
    bom = b"\xef\xbb\xbf" + json.dumps({"image": standard}).encode()
    assert _post(server, f"predictions/{BATCH_MODEL}", data=bom, headers={"Content-Type": "application/json"}).status_code == 200
    missing = _post(server, f"v2/models/{BATCH_MODEL}/infer", json={"id": "1", "parameters": {"top_k": 1}})
    assert missing.status_code == 400 and 'the body has no "inputs"' in missing.json()["message"]


def test_error_messages_never_echo_a_megabyte(server):
    huge = "m" * 1_000_000
    answer = _post(server, f"predictions/{BATCH_MODEL}", json={"image": _b64(save(photo(), "PNG")), "method": huge})
    assert answer.status_code == 400 and len(answer.content) < 1500, len(answer.content)
