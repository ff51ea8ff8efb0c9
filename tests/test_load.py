"""Load tests: the answer checks, token renewal against the real TorchServe, and a 15 s Locust smoke run."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from payloads import (  # load_tests/ is on pytest's pythonpath
    Photo,
    TokenKeeper,
    check_answer,
    parse_sizes,
    photos,
    request_kwargs,
)
from PIL import Image

from tests.helpers.serving import DEFAULT_MODEL

REPO_ROOT = Path(__file__).resolve().parent.parent


def _png(width: int, height: int, mode: str = "L") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _answer(width: int = 451, height: int = 300, data: str | None = None, **heatmap) -> dict:
    return {
        "model": "m",
        "predictions": [{"index": 285, "label": "Egyptian cat", "score": 0.6}, {"index": 1, "label": "x", "score": 0.1}],
        "explanations": [{"target": 285, "label": "Egyptian cat", "method": "gradcam", "layers": ["bn2"],
                          "heatmap": {"format": "png", "width": width, "height": height,
                                      "data": data if data is not None else _png(width, height), **heatmap}}],
    }  # fmt: skip


PHOTO = Photo("chelsea", 451, 300, "PNG", b"")


def test_check_answer_accepts_a_right_answer_and_names_each_wrong_one() -> None:
    def check(answer: dict, explained: bool = True, status: int = 200) -> str | None:
        return check_answer(status, json.dumps(answer).encode(), PHOTO, "m", explained)

    assert check(_answer()) is None
    assert "HTTP 503" in check(_answer(), status=503)
    assert "heatmap says 300x451" in check(_answer(300, 451))
    # declared size right, but the PNG itself has another size / mode / is garbage
    assert "heatmap PNG is 224x224" in check(_answer(data=_png(224, 224)))
    assert "expected 8-bit grayscale" in check(_answer(data=_png(451, 300, "RGB")))
    assert "not a valid PNG" in check(_answer(data=base64.b64encode(b"\x89PNG not really").decode()))
    no_explanations = _answer()
    del no_explanations["explanations"]
    assert "expected 1 explanation" in check(no_explanations)
    assert "did not ask for" in check(_answer(), explained=False)
    unsorted = _answer()
    unsorted["predictions"].reverse()
    assert check(unsorted) == "predictions are not sorted by score"
    assert "does not name model" in check({**_answer(), "model": "other"})
    assert "not JSON" in check_answer(200, b"<html>", PHOTO, "m", True)


def _b64png(array) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_check_answer_knows_every_task() -> None:
    """Detectors, segmenters and embedding models answer with their own schema; each is checked."""
    import numpy as np

    heatmap = {"format": "png", "width": 451, "height": 300, "data": _png(451, 300)}

    def check(answer: dict, explained: bool = True, targets: int | None = 1) -> str | None:
        return check_answer(200, json.dumps({"model": "m", **answer}).encode(), PHOTO, "m", explained, targets)

    detections = [{"index": 0, "box": [10.0, 20.0, 200.0, 299.5], "class": 1, "label": "cat", "score": 0.9},
                  {"index": 1, "box": [0.0, 0.0, 451.0, 300.0], "class": 2, "label": "dog", "score": 0.4}]  # fmt: skip
    boxes = [{"box_index": 1, "method": "eigencam", "layers": ["backbone"], "heatmap": heatmap}]
    assert check({"detections": detections, "explanations": boxes}) is None
    assert check({"detections": [], "explanations": []}) is None  # nothing found, nothing explained
    assert check({"detections": detections}, explained=False) is None
    assert "inside the 451x300 image" in check({"detections": [{**detections[0], "box": [10, 20, 452, 120]}]}, False)
    assert "not sorted" in check({"detections": [{**detections[0], "score": 0.3}, detections[1]]}, explained=False)
    assert "malformed detection" in check({"detections": detections[::-1]}, explained=False)  # index != rank
    assert "not among the detections" in check({"detections": detections, "explanations": [{**boxes[0], "box_index": 2}]})
    assert "box explanation" in check({"detections": detections, "explanations": []})

    mask = np.zeros((300, 451), np.uint8)
    mask[:100] = 15
    classes = [{"index": 0, "label": "__background__", "pixels": 451 * 200}, {"index": 15, "label": "person", "pixels": 451 * 100}]
    mask_entry = {"format": "png", "width": 451, "height": 300, "data": _b64png(mask)}
    regions = [{"target": 15, "label": "person", "method": "gradcam", "layers": ["backbone"], "heatmap": heatmap}]
    assert check({"mask": mask_entry, "classes": classes, "explanations": regions}) is None
    assert "do not add up" in check({"mask": mask_entry, "classes": classes[:1]}, explained=False)
    assert "mask PNG is 224x224" in check(
        {"mask": {**mask_entry, "data": _b64png(np.zeros((224, 224), np.uint8))}, "classes": classes}, explained=False
    )

    similarities = [{"concept": "cat", "similarity": 0.83}, {"concept": "coffee", "similarity": -0.1}]
    concepts = [{"concept": c, "target": "similarity", "method": "gradcam", "layers": ["layer4.-1"], "heatmap": heatmap}
                for c in ("cat", "coffee")]  # fmt: skip
    assert check({"similarities": similarities, "explanations": concepts}, targets=None) is None
    assert "expected 1 explanation" in check({"similarities": similarities, "explanations": concepts}, targets=1)
    assert "malformed similarities" in check({"similarities": [{"concept": "cat", "similarity": 3}]}, explained=False)
    assert "no predictions, detections" in check({"boxes": []})


def test_photos_come_in_every_size_and_encoding() -> None:
    sizes = parse_sizes("224x224,451x300,native")
    encoded = photos(sizes, names=("chelsea", "rocket"))
    assert [(p.name, p.width, p.height) for p in encoded] == [
        ("chelsea", 224, 224), ("chelsea", 451, 300), ("chelsea", 451, 300),
        ("rocket", 224, 224), ("rocket", 451, 300), ("rocket", 640, 427),
    ]  # fmt: skip
    for photo in encoded:
        assert Image.open(io.BytesIO(photo.body)).size == (photo.width, photo.height)
    assert {p.format for p in encoded} == {"JPEG", "PNG"}
    as_json = request_kwargs(encoded[0], "json", {"explain": True})["json"]
    assert base64.b64decode(as_json["image"]) == encoded[0].body and as_json["explain"] is True
    assert request_kwargs(encoded[0], "multipart")["files"]["data"][1] == encoded[0].body
    with pytest.raises(ValueError):
        parse_sizes("8x8")


def test_token_keeper_renews_an_expiring_token_on_the_real_server(server) -> None:
    """Near expiry the keeper asks TorchServe for a new token: the old one is refused, the new one works."""
    key_file = server.workdir / "key_file.json"
    keeper = TokenKeeper(key_file, server.url("management"))
    old = keeper.token()
    assert keeper.renewals == 0 and keeper.expires is not None
    later = TokenKeeper(
        key_file, server.url("management"), clock=lambda: keeper.expires - dt.timedelta(seconds=30)
    )
    new = later.token()  # 30 s before expiry, inside the 60 s margin
    assert new != old and later.renewals == 1
    assert json.loads(key_file.read_text())["inference"]["key"] == new
    ping = f"{server.url()}/ping"
    assert requests.get(ping, headers={"Authorization": f"Bearer {new}"}, timeout=30).status_code == 200
    refused = requests.get(ping, headers={"Authorization": f"Bearer {old}"}, timeout=30)
    assert refused.status_code == 400 and "InvalidKeyException" in refused.text
    # a keeper still holding the old key recovers from the rejection by re-reading the file (no renewal)
    assert keeper.rejected(old) == new and keeper.renewals == 0


def _locust(server, tmp_path: Path, model: str, run_time: str, *extra: str, requests_: int = 0) -> subprocess.CompletedProcess:
    """`make loadtest` in small: the mix against ``model``, bounded by ``run_time`` and (``requests_``) by a
    request count; the SLO bounds failures only (p95 under 60 s):
    on a loaded shared CI machine the latency of the session's server says little, while a wrong or
    failed answer always fails the test."""
    slo = tmp_path / "slo.yaml"
    slo.write_text("max_failure_ratio: 0.0\np95_ms:\n  predictions: 60000\n  explanations: 60000\n")
    command = [
        sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "load_tests" / "locustfile.py"),
        "--headless", "--only-summary", "-u", "3", "-r", "3", "--run-time", run_time, "--stop-timeout", "60",
        "--host", server.url(), "--management-url", server.url("management"),
        "--key-file", str(server.workdir / "key_file.json"), "--tags", "mix", "--model", model,
        "--sizes", "224x224,451x300", "--slo", str(slo), "--csv", str(tmp_path / "locust"),
        "--html", str(tmp_path / "report.html"), "--max-requests", str(requests_), *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)


def _stats(tmp_path: Path) -> tuple[dict, dict]:
    with open(tmp_path / "locust_stats.csv", newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    return rows.pop("Aggregated"), rows


def test_locust_smoke_run_against_the_session_server(server, tmp_path: Path) -> None:
    """3 users, the mix, 24 requests (at most 15 s; a quiet machine answers many times more in 15 s): zero
    failures, the SLO met, reports written; the run stops at its request count."""
    for path in ("predictions", "explanations"):  # warm the worker: the first calls pay lazy initialisation
        body = (REPO_ROOT / "docs" / "chelsea.jpg").read_bytes()
        answer = requests.post(
            f"{server.url()}/{path}/{DEFAULT_MODEL}", data=body, headers=server.headers(), timeout=120
        )
        assert answer.status_code == 200, answer.text[:300]
    started = time.monotonic()
    done = _locust(server, tmp_path, DEFAULT_MODEL, "15s", requests_=24)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SLO met" in done.stdout + done.stderr
    total, rows = _stats(tmp_path)
    # at most 24 (+ two each of the 3 users: the one in flight and one begun before the stop); fewer when the
    # 15 s came first on a loaded machine
    assert 0 < int(total["Request Count"]) <= 24 + 6 and int(total["Failure Count"]) == 0, total
    printed = int(re.search(r"SLO met \(.*\): (\d+) requests", done.stdout + done.stderr).group(1))
    if printed >= 24:  # stopped by the count: the CSV holds the final figures (a quick run once left it at 0)
        assert int(total["Request Count"]) == printed, (total, printed)
    assert time.monotonic() - started < 60
    endpoints = {name.split(" ")[0] for name in rows}
    assert {f"/predictions/{DEFAULT_MODEL}", f"/explanations/{DEFAULT_MODEL}"} <= endpoints, rows.keys()
    assert (tmp_path / "locust_failures.csv").read_text().count("\n") <= 1  # the header only
    html = (tmp_path / "report.html").read_text()
    assert "locust" in html.lower() and f"/explanations/{DEFAULT_MODEL}" in html


# detection's answers are checked by check_answer above; its Locust run (a slower model) is in `make test-peer`
@pytest.mark.parametrize("task", [pytest.param("detection", marks=pytest.mark.peer), "embedding"])
def test_locust_loads_other_tasks_models(server, tmp_path: Path, task: str) -> None:
    """The same mix against a detector and an embedding model (which needs a concept in every request):
    every answer is checked against its task's schema; no failure."""
    from tests.helpers.serving import DETECTION_MODEL, EMBEDDING_MODEL

    model, extra = {
        "detection": (DETECTION_MODEL, ()),
        "embedding": (EMBEDDING_MODEL, ("--request-options", '{"concept": "cat"}', "--encodings", "multipart,json")),
    }[task]
    done = _locust(server, tmp_path, model, "8s", *extra, requests_=12)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    total, rows = _stats(tmp_path)
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    names = " ".join(rows)
    assert f"/explanations/{model}" in names and f"/predictions/{model}" in names
    bad = _locust(server, tmp_path, model, "2s", "--request-options", "[1, 2]")
    assert bad.returncode != 0 and "give a JSON object" in bad.stdout + bad.stderr


def _make_loadtest(server, tmp_path: Path, slo: str, **variables: str) -> subprocess.CompletedProcess:
    """`make loadtest` itself against the session server (the venv running these tests; no install)."""
    venv = Path(sys.executable).parent.parent
    (tmp_path / "slo.yaml").write_text(slo)
    settings = {
        "VENV": str(venv), "LOAD_HOST": server.url(), "LOAD_MANAGEMENT": server.url("management"),
        "KEY_FILE": str(server.workdir / "key_file.json"), "RESULTS": str(tmp_path / "results"),
        "SLO": str(tmp_path / "slo.yaml"), "USERS": "1", "RUN_TIME": "3s", "WARMUP": "1", **variables,
    }  # fmt: skip
    command = ["make", "--no-print-directory", "-C", str(REPO_ROOT), "loadtest",
               "-o", f"{venv}/.installed-extra-load", *(f"{k}={v}" for k, v in settings.items())]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def test_make_loadtest_prints_the_report_path_on_an_slo_breach_and_fails(server, tmp_path: Path) -> None:
    """An impossible p95 (1 ms): Locust exits 1, make 2 (its code for a failed recipe), and the report path
    is printed all the same; the warm-up ran and is not in the counts; no empty user class warning."""
    done = _make_loadtest(server, tmp_path, "max_failure_ratio: 0.0\np95_ms:\n  explanations: 1\n",
                          SCENARIO="explanations")  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert f"reports in {tmp_path / 'results'}/ (locust exit code 1)" in out, out[-3000:]
    assert "SLO breached" in out and (tmp_path / "results" / "report.html").exists()
    assert "warm-up: 1 request(s) each of explanations" in out, out[-3000:]
    assert "no tasks left after filtering" not in out
    total, rows = _stats(tmp_path / "results")
    assert set(rows) == {f"/explanations/{DEFAULT_MODEL}"}, rows.keys()  # only the measured scenario


def test_embedding_model_without_a_concept_stops_at_once_with_the_reason(server, tmp_path: Path) -> None:
    """No --request-options for an embedding model: the first warm-up answer is wrong, so the run stops
    before it starts (no user spawned, no CSV), saying what the server said and what to pass."""
    from tests.helpers.serving import EMBEDDING_MODEL

    started = time.monotonic()
    done = _make_loadtest(server, tmp_path, "max_failure_ratio: 0.0\n", MODEL=EMBEDDING_MODEL, RUN_TIME="60s")
    elapsed = time.monotonic() - started
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert f"request to /predictions/{EMBEDDING_MODEL}" in out and "did not start" in out, out[-3000:]
    assert "LOAD_REQUEST_OPTIONS='{\"concept\": \"cat\"}'" in out, out[-3000:]
    assert elapsed < 45, f"took {elapsed:.0f}s of a 60s run"  # stopped at once, not after the run
    stats = tmp_path / "results" / "locust_stats.csv"
    if stats.exists():  # Locust may write its CSV header on its way out: no request in it
        with open(stats, newline="") as handle:
            assert sum(int(row["Request Count"]) for row in csv.DictReader(handle)) == 0
    assert "no report (locust exit code 1)" in out, out[-3000:]
