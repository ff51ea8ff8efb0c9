"""Prediction auditing against a real TorchServe: records, sampling, concurrency, --stop, bad directories.

The archives (tests/helpers/serving.py) serve a tiny random-init model with ``handler.audit`` on; their
records land under ``serving.AUDIT_ROOT``. Records are written off the request path, so each test
polls the database (bounded) for the records of the requests it sent, identified by the
``x-request-id`` TorchServe returns.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import sqlite3
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from model_store import serve
from tests.helpers.answers import post
from tests.helpers.inputs import b64, encode, square_image
from tests.helpers.serving import (
    AUDIT_FULL,
    AUDIT_OFF,
    AUDIT_ROOT,
    AUDIT_STRICT,
    AUDIT_UNWRITABLE,
    DEFAULT_MODEL,
)

FULL_DB = AUDIT_ROOT / "full" / "audit.sqlite3"


def records_for(db: Path, request_ids: list[str], timeout: float = 60.0) -> dict[str, list[dict]]:
    """request id -> its records, once every id has one (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, list[dict]] = {}
        if db.exists():
            connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
            connection.row_factory = sqlite3.Row
            try:
                marks = ",".join("?" * len(request_ids))
                for row in connection.execute(f"SELECT * FROM audit_records WHERE request_id IN ({marks})", request_ids):
                    found.setdefault(row["request_id"], []).append(dict(row))
            finally:
                connection.close()
        if len(found) == len(set(request_ids)) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_every_request_leaves_one_record_with_the_right_fields(server) -> None:
    images = [encode(square_image(60, 90, (10, 5 + 20 * i, 40, 35 + 20 * i), seed=100 + i)) for i in range(3)]
    answers = [
        post(server, f"explanations/{AUDIT_FULL}", images[0]),
        post(server, f"predictions/{AUDIT_FULL}", images[1]),
        post(server, f"explanations/{AUDIT_FULL}", {"image": b64(images[2]), "targets": [2, "class_5"]}),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    bodies = [a.json() for a in answers]
    assert "explanations" not in bodies[1]  # auditing does not change what the client gets
    ids = [a.headers["x-request-id"] for a in answers]
    found = records_for(FULL_DB, ids)
    assert sorted(found) == sorted(ids) and all(len(v) == 1 for v in found.values())
    for image, body, request_id, explained in zip(images, bodies, ids, (True, False, True)):
        record = found[request_id][0]
        assert record["model"] == AUDIT_FULL and record["version"] == "1.0"
        assert record["weights"] == body["weights"] and record["weights"].startswith("random-init")
        assert record["timestamp"].endswith("Z") and abs(record["epoch"] - time.time()) < 300
        assert record["input_sha256"] == hashlib.sha256(image).hexdigest() and record["input_bytes"] == len(image)
        assert (record["image_width"], record["image_height"]) == (90, 60)
        assert json.loads(record["predictions"]) == body["predictions"]
        assert (record["top_index"], record["top_score"]) == (body["predictions"][0]["index"], body["predictions"][0]["score"])
        assert record["method"] == "gradcam" and json.loads(record["layers"]) == ["bn2"]
        assert bool(record["explained"]) is explained
        # store_inputs: the exact bytes, beside the database
        assert (FULL_DB.parent / record["input_path"]).read_bytes() == image
        explanations = json.loads(record["explanations"])
        for entry in explanations:
            stored = png_array((FULL_DB.parent / entry["heatmap_path"]).read_bytes())
            assert stored.shape == (60, 90)
            assert stored[entry["peak_y"], entry["peak_x"]] >= stored.max() - 1  # the peak, within 8-bit rounding
            values = np.sort(stored.astype(np.float64).ravel())[::-1]
            assert entry["top10_mass"] == pytest.approx(values[: int(np.ceil(0.1 * values.size))].sum() / values.sum(), abs=0.02)
            p = values[values > 0] / values.sum()
            assert entry["entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(values.size), abs=0.02)
            faith = entry["faithfulness"]
            assert faith["basis"] == "softmax" and faith["drop"] == pytest.approx(faith["before"] - faith["after"], abs=2e-6)
        assert record["faithfulness"] == explanations[0]["faithfulness"]["drop"] and record["faithfulness_ms"] > 0
    # targets: the top class unless the request named some; the record's heatmap is the response's
    top = bodies[0]["predictions"][0]
    record = found[ids[0]][0]
    assert json.loads(record["targets"]) == [{"target": top["index"], "label": top["label"]}]
    stored = (FULL_DB.parent / json.loads(record["explanations"])[0]["heatmap_path"]).read_bytes()
    assert np.array_equal(png_array(stored), png_array(base64.b64decode(bodies[0]["explanations"][0]["heatmap"]["data"])))
    faith = json.loads(record["explanations"])[0]["faithfulness"]
    assert faith["before"] == pytest.approx(top["score"], abs=2e-6)  # confidence = the served softmax score
    top1 = bodies[1]["predictions"][0]
    assert json.loads(found[ids[1]][0]["targets"]) == [{"target": top1["index"], "label": top1["label"]}]
    assert json.loads(found[ids[2]][0]["targets"]) == [{"target": 2, "label": "class_2"}, {"target": 5, "label": "class_5"}]


def test_sample_rate_zero_leaves_no_record(server) -> None:
    images = [encode(square_image(48, 48, (4, 4, 20, 20), seed=200 + i)) for i in range(4)]
    answers = [post(server, f"{'explanations' if i % 2 else 'predictions'}/{AUDIT_OFF}", image) for i, image in enumerate(images)]
    assert [a.status_code for a in answers] == [200] * 4
    time.sleep(1.0)  # a record would be committed within milliseconds
    db = AUDIT_ROOT / "off" / "audit.sqlite3"
    assert db.exists()  # the sink is live (opened at load) ...
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert connection.execute("SELECT COUNT(*) FROM audit_records").fetchone()[0] == 0  # ... and empty
    finally:
        connection.close()
    assert not (AUDIT_ROOT / "off" / "heatmaps").exists()


def _tiny_pngs(count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [encode(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def _send_concurrently(server, images: list[bytes], clients: int = 8) -> list[requests.Response]:
    session_headers = server.headers()

    def one(pair: tuple[int, bytes]) -> requests.Response:
        index, image = pair
        path = "explanations" if index % 5 == 0 else "predictions"
        return requests.post(f"{server.url()}/{path}/{AUDIT_FULL}", data=image, headers=session_headers, timeout=120)

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, enumerate(images)))


def test_concurrent_clients_lose_no_record_and_duplicate_none(server) -> None:
    images = _tiny_pngs(500, seed=7)
    started = time.monotonic()
    answers = _send_concurrently(server, images)
    assert [a.status_code for a in answers] == [200] * 500, {a.status_code for a in answers}
    ids = [a.headers["x-request-id"] for a in answers]
    assert len(set(ids)) == 500
    found = records_for(FULL_DB, ids, timeout=60)
    duplicates = {k: len(v) for k, v in found.items() if len(v) != 1}
    assert len(found) == 500 and not duplicates, (len(found), duplicates)
    for image, request_id in zip(images, ids):
        assert found[request_id][0]["input_sha256"] == hashlib.sha256(image).hexdigest()
    print(f"500 audited requests from 8 clients in {time.monotonic() - started:.1f}s")


def _metric(server, name: str, model: str) -> float:
    text = requests.get(f"{server.url('metrics')}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'ModelName="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_unwritable_directory_never_fails_a_prediction_and_is_reported(server) -> None:
    deadline = time.monotonic() + 60
    sent = 0
    while True:  # the counter is published with the batch after the failed write
        answer = post(server, f"explanations/{AUDIT_UNWRITABLE}", encode(square_image(40, 40, (5, 5, 20, 20), seed=sent)))
        sent += 1
        assert answer.status_code == 200 and answer.json()["predictions"] and answer.json()["explanations"]
        if _metric(server, "AuditWriteErrors", AUDIT_UNWRITABLE) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert 1 <= _metric(server, "AuditWriteErrors", AUDIT_UNWRITABLE) <= sent
    log = (Path(server.workdir) / "logs" / "model_log.log").read_text(errors="replace")
    assert re.search(r"audit sink SqliteSink\('.*blocker/audit/audit\.sqlite3'\) cannot be opened", log)
    assert not (AUDIT_ROOT / "blocker").is_dir()


def test_records_survive_torchserve_stop_right_after_the_responses(server, tmp_path, monkeypatch) -> None:
    """Our own short-lived TorchServe (the shared one must keep running), stopped as soon as the last
    answer arrives: every answered request has its record."""
    monkeypatch.setenv("CAM_AUDIT_TEST_DIR", str(tmp_path))
    workdir = tmp_path / "ts"
    workdir.mkdir()
    ports = {api: serve.free_port() for api in serve.PORT_VARIABLES}
    own = serve.start(workdir, Path(server.workdir) / "model_store", [AUDIT_FULL], ports=ports, timeout=240)
    try:
        answers = _send_concurrently(own, _tiny_pngs(24, seed=11))
    finally:
        serve.stop(workdir)
    assert [a.status_code for a in answers] == [200] * 24
    ids = [a.headers["x-request-id"] for a in answers]
    found = records_for(tmp_path / "full" / "audit.sqlite3", ids, timeout=5)
    assert sorted(found) == sorted(ids) and all(len(v) == 1 for v in found.values())


def test_archives_ship_the_auditor_but_not_the_offline_report_or_cli(server) -> None:
    """The worker records through handlers.audit; the HTML report and ``python -m handlers.audit`` stay out."""
    names = zipfile.ZipFile(server.workdir / "model_store" / f"{AUDIT_FULL}.mar").namelist()
    shipped = {name.split("handlers/audit/", 1)[1] for name in names if "handlers/audit/" in name}
    assert {"__init__.py", "auditor.py", "sinks.py", "writer.py"} <= shipped, sorted(names)
    assert not shipped & {"report.py", "__main__.py"}, sorted(shipped)


def test_served_road_faithfulness_and_endpoint_are_recorded(server) -> None:
    """The strict archive audits with faithfulness: road; its record is committed before the answer."""
    image = encode(square_image(60, 90, (10, 20, 40, 60), seed=7))
    answer = post(server, f"explanations/{AUDIT_STRICT}", {"image": b64(image), "targets": [4]})
    assert answer.status_code == 200, answer.text[:200]
    (record,) = records_for(AUDIT_ROOT / "strict" / "audit.sqlite3", [answer.headers["x-request-id"]], timeout=5)[
        answer.headers["x-request-id"]
    ]
    assert record["endpoint"] == "explanations"
    faith = json.loads(record["explanations"])[0]["faithfulness"]
    assert faith["perturbation"] == "road" and -1.0 <= faith["drop"] <= 1.0
    assert faith["drop"] == pytest.approx(faith["before"] - faith["after"], abs=1e-6)
    assert record["faithfulness"] == pytest.approx(faith["drop"], abs=1e-6)


def test_served_raw_maps_and_overlay_options(server) -> None:
    """float16 at the input grid decodes to the served PNG's map; an overlay follows colormap and alpha."""
    photo = encode(square_image(120, 160, (20, 40, 90, 120), seed=3), "JPEG")
    body = {"image": b64(photo), "heatmap_format": "float16", "heatmap_size": "input"}
    raw = post(server, f"explanations/{DEFAULT_MODEL}", body).json()["explanations"][0]["heatmap"]
    assert raw["format"] == "float16" and raw["dtype"] == "float16" and raw["grid"] == "input"
    values = np.frombuffer(base64.b64decode(raw["data"]), "<f2").reshape(raw["shape"])
    assert tuple(raw["shape"]) == (224, 224) and float(values.min()) >= 0 and float(values.max()) == pytest.approx(1, abs=1e-3)
    npy = post(server, f"explanations/{DEFAULT_MODEL}", {**body, "heatmap_format": "npy", "heatmap_size": "image"})
    image_map = np.load(io.BytesIO(base64.b64decode(npy.json()["explanations"][0]["heatmap"]["data"])))
    assert image_map.shape == (120, 160) and image_map.dtype == np.float32
    overlays = {}
    for colormap, alpha in (("jet", 0.5), ("viridis", 0.5), ("viridis", 0.9)):
        answer = post(server, f"explanations/{DEFAULT_MODEL}",
                      {"image": b64(photo), "output": "overlay", "colormap": colormap, "alpha": alpha})  # fmt: skip
        overlays[colormap, alpha] = png_array(base64.b64decode(answer.json()["explanations"][0]["overlay"]["data"]))
    assert all(o.shape == (120, 160, 3) for o in overlays.values())
    differ = lambda a, b: float(np.abs(overlays[a].astype(int) - overlays[b].astype(int)).mean())  # noqa: E731
    assert differ(("jet", 0.5), ("viridis", 0.5)) > 5 and differ(("viridis", 0.5), ("viridis", 0.9)) > 5
    bad = post(server, f"explanations/{DEFAULT_MODEL}", {"image": b64(photo), "output": "overlay", "colormap": "sepia"})
    assert bad.status_code == 400 and "colormap" in bad.json()["message"] and "viridis" in bad.json()["message"]

