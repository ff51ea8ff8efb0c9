"""Integration: the detection, segmentation and embedding handlers behind the session's real TorchServe."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from test_serving import post

from tests.helpers.inputs import b64, encode, square_image
from tests.helpers.serving import (
    CLIP_EMBEDDING_MODEL,
    DETECTION_LABELS,
    DETECTION_MAX,
    DETECTION_MODEL,
    EMBEDDING_MODEL,
    SEGMENTATION_MODEL,
    YOLO_MODEL,
)
from tests.helpers.tiny_yolo import HAVE_ULTRALYTICS

# Non-square on purpose: every picture that comes back must have this size.
HEIGHT, WIDTH = 90, 150
IMAGE = encode(square_image(HEIGHT, WIDTH, (20, 80, 70, 140)))
OTHER = encode(square_image(HEIGHT, WIDTH, (10, 10, 50, 60), seed=3))


def _png(picture: dict) -> np.ndarray:
    assert picture["format"] == "png"
    image = Image.open(io.BytesIO(base64.b64decode(picture["data"])))
    assert image.size == (picture["width"], picture["height"]) == (WIDTH, HEIGHT)
    return np.asarray(image)


def test_detection_schema_and_one_heatmap_per_requested_box(server) -> None:
    answer = post(server, f"explanations/{DETECTION_MODEL}", {"image": b64(IMAGE), "boxes": [0, 3, 5], "method": "gradcam"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"model", "version", "weights", "detections", "explanations"}
    detections = body["detections"]
    assert 5 < len(detections) <= DETECTION_MAX
    assert [d["index"] for d in detections] == list(range(len(detections)))
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)
    for d in detections:
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 <= x1 <= WIDTH and 0 <= y0 <= y1 <= HEIGHT  # in the submitted image's pixels
        assert d["label"] == DETECTION_LABELS[d["class"]]
    explanations = body["explanations"]
    assert [e["box_index"] for e in explanations] == [0, 3, 5]
    for e in explanations:
        assert e["box"] == detections[e["box_index"]]["box"] and e["label"] == detections[e["box_index"]]["label"]
        assert e["method"] == "gradcam" and e["layers"] == ["backbone"]
        _png(e["heatmap"])


def test_detection_defaults_threshold_and_bad_boxes(server) -> None:
    answer = post(server, f"explanations/{DETECTION_MODEL}", IMAGE)
    body = answer.json()
    assert answer.status_code == 200 and [e["box_index"] for e in body["explanations"]] == [0, 1]  # explain_top
    assert body["explanations"][0]["method"] == "eigencam"
    plain = post(server, f"predictions/{DETECTION_MODEL}", IMAGE).json()
    assert "explanations" not in plain and plain["detections"] == body["detections"]
    cut = sorted(d["score"] for d in body["detections"])[len(body["detections"]) // 2]
    fewer = post(server, f"predictions/{DETECTION_MODEL}", {"image": b64(IMAGE), "score_threshold": cut}).json()
    assert fewer["detections"] == [d for d in body["detections"] if d["score"] >= cut]
    jobs = [
        ({"image": b64(IMAGE), "boxes": [DETECTION_MAX]}, 400),  # beyond what is ever returned
        ({"image": b64(IMAGE), "boxes": [0], "score_threshold": 1.0}, 400),  # no detection left
        ({"image": b64(IMAGE), "boxes": "first"}, 400),
        ({"image": b64(IMAGE), "score_threshold": 2}, 400),
        ({"image": b64(IMAGE), "boxes": [1]}, 200),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: post(server, f"explanations/{DETECTION_MODEL}", job[0]), jobs))
    for (job, code), answer in zip(jobs, answers):
        assert answer.status_code == code, (job.keys(), answer.text[:200])
        if code != 200:
            assert answer.json()["code"] == code and answer.json()["message"]
    assert "out of range" in answers[1].json()["message"]


def test_demo_detector_answers_boxes_and_a_distinct_heatmap_per_box(server) -> None:
    """The offline demo detector (fasterrcnn_demo: random weights, no score floor) answers boxes with no
    option at all (a random detector built from the COCO configs answers none), and a gradient method
    gives each box its own map: real CAM work per box, which `make loadtest MODEL=fasterrcnn_demo` measures."""
    plain = post(server, f"predictions/{DETECTION_MODEL}", IMAGE)
    assert plain.status_code == 200 and len(plain.json()["detections"]) >= 1, plain.text[:300]
    answer = post(server, f"explanations/{DETECTION_MODEL}", {"image": b64(IMAGE), "boxes": [0, 1, 2], "method": "hirescam"})
    assert answer.status_code == 200, answer.text
    maps = [_png(e["heatmap"]).astype(float) for e in answer.json()["explanations"]]
    assert len(maps) == 3
    for index, heat in enumerate(maps):
        assert heat.max() > 0 and heat.std() > 1, index  # not blank, not flat
    for first in range(3):
        for second in range(first + 1, 3):
            assert np.abs(maps[first] - maps[second]).mean() > 1, (first, second)  # each box its own map


@pytest.mark.skipif(not HAVE_ULTRALYTICS, reason="the optional 'ultralytics' package is not installed")
def test_yolo_boxes_and_a_heatmap_per_box(server) -> None:
    from handlers.models.yolo import coco80_labels

    labels = coco80_labels()
    requests = [
        {"image": b64(IMAGE), "boxes": [0, 2], "method": "gradcam", "output": "both"},
        {"image": b64(OTHER)},  # defaults: EigenCAM, the best explain_top boxes
        {"image": b64(IMAGE), "boxes": [19]},  # the 20th box: explained only if 20 boxes pass the threshold
        {"image": b64(IMAGE), "boxes": [25]},  # beyond max_detections: refused before the model runs
        {"image": b64(IMAGE), "method": "scorecam"},  # not allowed by the config
        {"image": base64.b64encode(b"not an image").decode()},  # 415, even with Ultralytics imported
    ]
    with ThreadPoolExecutor(len(requests)) as pool:  # batched together (batchSize 4, maxBatchDelay 50)
        answers = list(pool.map(lambda body: post(server, f"explanations/{YOLO_MODEL}", body), requests))
    first, default = answers[0], answers[1]
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["weights"].startswith("file:yolov8n-test.pt")
    detections = body["detections"]
    assert 3 <= len(detections) <= 20
    assert [d["score"] for d in detections] == sorted((d["score"] for d in detections), reverse=True)
    for d in detections:
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 <= x1 <= WIDTH and 0 <= y0 <= y1 <= HEIGHT and d["score"] >= 0.01
        assert d["label"] == labels[d["class"]]
    assert [e["box_index"] for e in body["explanations"]] == [0, 2]
    maps = []
    for e in body["explanations"]:
        assert e["method"] == "gradcam" and e["layers"] == ["model.model.15", "model.model.18", "model.model.21"]
        assert e["box"] == detections[e["box_index"]]["box"]
        maps.append(_png(e["heatmap"]))
        overlay = Image.open(io.BytesIO(base64.b64decode(e["overlay"]["data"])))
        assert overlay.size == (WIDTH, HEIGHT)
    assert maps[0].max() > 0 and not np.array_equal(maps[0], maps[1])
    assert default.status_code == 200, default.text
    default_body = default.json()
    assert [e["method"] for e in default_body["explanations"]] == ["eigencam"] * 3
    for e in default_body["explanations"]:
        _png(e["heatmap"])
    bounded = answers[2]
    assert bounded.status_code == (200 if len(detections) > 19 else 400), bounded.text
    assert answers[3].status_code == 400 and "out of range" in answers[3].json()["message"]
    assert answers[4].status_code == 400 and "eigencam" in answers[4].json()["message"]
    assert answers[5].status_code == 415, answers[5].text


def test_segmentation_mask_has_the_image_size(server) -> None:
    answer = post(server, f"explanations/{SEGMENTATION_MODEL}", {"image": b64(IMAGE), "output": "both"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"model", "version", "weights", "mask", "classes", "explanations"}
    mask = _png(body["mask"])
    counts = np.bincount(mask.reshape(-1), minlength=21)
    assert mask.max() < 21
    assert {c["index"]: c["pixels"] for c in body["classes"]} == {i: int(n) for i, n in enumerate(counts) if n}
    assert sum(c["fraction"] for c in body["classes"]) == pytest.approx(1.0, abs=1e-4)
    (explanation,) = body["explanations"]
    present = [c for c in body["classes"] if c["index"] != 0] or body["classes"]
    assert explanation["target"] == max(present, key=lambda c: c["pixels"])["index"]
    _png(explanation["heatmap"])
    overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay"]["data"])))
    assert overlay.size == (WIDTH, HEIGHT)


def test_segmentation_classes_and_bad_classes(server) -> None:
    jobs = [
        ({"image": b64(IMAGE), "classes": ["cat", 15]}, 200),
        ({"image": b64(IMAGE), "classes": ["unicorn"]}, 400),
        ({"image": b64(IMAGE), "classes": [21]}, 400),
        ({"image": b64(IMAGE), "classes": list(range(6))}, 400),
        (IMAGE, 200),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: post(server, f"explanations/{SEGMENTATION_MODEL}", job[0]), jobs))
    for (_, code), answer in zip(jobs, answers):
        assert answer.status_code == code, answer.text[:200]
    first = answers[0].json()
    assert [(e["target"], e["label"]) for e in first["explanations"]] == [(8, "cat"), (15, "person")]
    assert "unicorn" in answers[1].json()["message"]


def test_embedding_similarity_and_heatmap(server) -> None:
    same = post(server, f"explanations/{EMBEDDING_MODEL}", {"image": b64(IMAGE), "references": [b64(IMAGE)]})
    assert same.status_code == 200, same.text
    body = same.json()
    assert set(body) == {"model", "version", "weights", "similarities", "explanations"}
    assert body["similarities"] == [{"concept": "references", "similarity": pytest.approx(1.0, abs=1e-4)}]
    _png(body["explanations"][0]["heatmap"])
    stored = post(
        server, f"explanations/{EMBEDDING_MODEL}", {"image": b64(IMAGE), "concept": ["cat", "coffee"], "target": "difference"}
    ).json()
    assert [s["concept"] for s in stored["similarities"]] == ["cat", "coffee"]
    assert all(-1 <= s["similarity"] <= 1 for s in stored["similarities"])
    assert [(e["concept"], e["target"]) for e in stored["explanations"]] == [("cat", "difference"), ("coffee", "difference")]
    for e in stored["explanations"]:
        _png(e["heatmap"])
    other = post(server, f"predictions/{EMBEDDING_MODEL}", {"image": b64(IMAGE), "references": [b64(OTHER)]}).json()
    assert other["similarities"][0]["similarity"] < 1 - 1e-4 and "explanations" not in other


def test_embedding_bad_requests_fail_alone(server) -> None:
    jobs = [
        ({"image": b64(IMAGE), "concept": "dog"}, 400),
        ({"image": b64(IMAGE), "references": [b64(OTHER)] * 3}, 400),  # max_references: 2
        ({"image": b64(IMAGE)}, 400),  # neither concept nor references
        ({"image": b64(IMAGE), "references": ["%%%"]}, 400),
        ({"image": b64(IMAGE), "concept": "cat", "target": "closeness"}, 400),
        ({"image": b64(IMAGE), "concept": "cat"}, 200),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: post(server, f"explanations/{EMBEDDING_MODEL}", job[0]), jobs))
    for (_, code), answer in zip(jobs, answers):
        assert answer.status_code == code, answer.text[:200]
        assert answer.headers["content-type"].startswith("application/json")
    assert "unknown concept 'dog'" in answers[0].json()["message"]
    assert "at most 2" in answers[1].json()["message"]


def test_clip_image_tower_as_an_embedding_model(server) -> None:
    """A CLIP image tower (architecture: clip, task: embedding): the stored concept image is most
    similar to itself, and the similarity heatmap comes back at a non-square image's size."""
    from model_store.build import CONFIG_DIR

    cat = (CONFIG_DIR / "concepts" / "cat.jpg").read_bytes()
    answer = post(server, f"explanations/{CLIP_EMBEDDING_MODEL}", {"image": b64(cat), "concept": ["cat", "coffee"]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    similarities = {s["concept"]: s["similarity"] for s in body["similarities"]}
    assert similarities["cat"] == pytest.approx(1.0, abs=1e-4) and similarities["coffee"] < similarities["cat"]
    assert [e["concept"] for e in body["explanations"]] == ["cat", "coffee"]
    answer = post(server, f"explanations/{CLIP_EMBEDDING_MODEL}",
                  {"image": b64(IMAGE), "references": [b64(OTHER)], "target": "difference"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    (explanation,) = answer.json()["explanations"]
    assert explanation["layers"] == ["vision_model.encoder.layers.-1.layer_norm1"]
    assert explanation["target"] == "difference" and _png(explanation["heatmap"]).max() > 0
