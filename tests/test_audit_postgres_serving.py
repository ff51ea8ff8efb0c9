"""The PostgreSQL audit sink behind a real TorchServe: two workers of one model writing the same database
concurrently (``durability: strict``), ``kill -9`` of one right after its answers, and the report rendered
from PostgreSQL in headless Chromium.

One short-lived TorchServe for the module (the session's shared one keeps its own archives): the archive
names no DSN, the worker reads ``$CAM_AUDIT_DSN`` (as a pod reads it from its Secret).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import requests

from handlers.audit.__main__ import main as audit_cli
from model_store import serve
from model_store.build import ArchiveSpec, build_archive
from tests.helpers.browser import headless_chromium, require_chromium
from tests.helpers.inputs import encode, square_image
from tests.helpers.serving import tiny_archive

MODEL = "audit_pg"


@pytest.fixture(scope="module")
def pg_server(postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[serve.Server, str]]:
    dsn = postgres.database("served")
    workdir = tmp_path_factory.mktemp("ts-pg")
    spec = tiny_archive(
        MODEL,
        {"minWorkers": 2, "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 20, "responseTimeout": 120},
        {"top_k": 3, "audit": {"enabled": True, "sink": "postgres", "durability": "strict", "store_inputs": True,
                               "faithfulness": True}},
    )  # fmt: skip
    build_archive(spec, workdir / "model_store", log=lambda line: None)
    previous = os.environ.get("CAM_AUDIT_DSN")
    os.environ["CAM_AUDIT_DSN"] = dsn  # the frontend passes its environment to the workers
    try:
        ports = {api: serve.free_port() for api in serve.PORT_VARIABLES}
        running = serve.start(workdir, workdir / "model_store", [MODEL], ports=ports, timeout=240)
    finally:
        if previous is None:
            os.environ.pop("CAM_AUDIT_DSN", None)
        else:
            os.environ["CAM_AUDIT_DSN"] = previous
    try:
        yield running, dsn
    finally:
        serve.stop(workdir)


def workers(server: serve.Server) -> list[dict]:
    return requests.get(f"{server.url('management')}/models/{MODEL}", headers=server.headers("management"),
                        timeout=30).json()[0]["workers"]  # fmt: skip


def send(server: serve.Server, count: int, seed: int, threads: int = 8) -> list[requests.Response]:
    images = [encode(square_image(48, 64, (4, 4, 30, 30), seed=seed + i)) for i in range(count)]

    def one(pair):
        index, image = pair
        path = "explanations" if index % 3 == 0 else "predictions"
        return requests.post(f"{server.url()}/{path}/{MODEL}", data=image, headers=server.headers(), timeout=120)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, enumerate(images)))


def records(dsn: str, ids: list[str]) -> list[tuple[str, int]]:
    with psycopg.connect(dsn) as connection:
        return connection.execute(
            "SELECT request_id, worker_pid FROM audit_records WHERE request_id = ANY(%s)", (ids,)
        ).fetchall()


def ready_pids(server: serve.Server, count: int = 2, timeout: float = 120, dead: int | None = None) -> set[int]:
    """The PIDs of the model's READY workers once ``count`` are (serve.start waits for the first only),
    ``dead`` not among them."""
    deadline = time.monotonic() + timeout
    while True:
        pids = {int(w["pid"]) for w in workers(server) if w["status"] == "READY"} - {dead}
        if len(pids) >= count or time.monotonic() > deadline:
            return pids
        time.sleep(0.5)


def test_two_workers_write_one_database_concurrently_and_strict_survives_kill_9(pg_server) -> None:
    server, dsn = pg_server
    pids = ready_pids(server)
    assert len(pids) == 2, workers(server)
    answers = send(server, 48, seed=500)
    assert [a.status_code for a in answers] == [200] * 48, [a.text for a in answers if a.status_code != 200][:2]
    ids = [a.headers["x-request-id"] for a in answers]
    found = records(dsn, ids)  # strict: committed before the answers left, no waiting
    assert sorted(r[0] for r in found) == sorted(ids)  # every answer once, none duplicated
    assert {r[1] for r in found} == pids  # both workers wrote
    # kill -9 a worker the moment its last answer arrived: every answered request is in the database
    victim = sorted(pids)[0]
    answers = send(server, 16, seed=900)
    os.kill(victim, signal.SIGKILL)
    answered = [a.headers["x-request-id"] for a in answers if a.status_code == 200]
    assert len(answered) == 16
    found = records(dsn, answered)
    assert sorted(r[0] for r in found) == sorted(answered), f"lost {len(set(answered) - {r[0] for r in found})}"
    assert len(ready_pids(server, dead=victim)) == 2  # the frontend restarted the worker; it reconnects and serves
    answers = send(server, 4, seed=1300)
    assert [a.status_code for a in answers] == [200] * 4
    assert len(records(dsn, [a.headers["x-request-id"] for a in answers])) == 4
    with psycopg.connect(dsn) as connection:
        total, unique = connection.execute("SELECT count(*), count(DISTINCT record_id) FROM audit_records").fetchone()
    assert total == unique == 68


def test_report_rendered_from_postgres_in_headless_chromium(pg_server, tmp_path: Path, capsys) -> None:
    require_chromium()
    server, dsn = pg_server
    answers = send(server, 6, seed=2000, threads=3)
    assert [a.status_code for a in answers] == [200] * 6
    with psycopg.connect(dsn) as connection:
        (held,) = connection.execute("SELECT count(*) FROM audit_records WHERE model = %s", (MODEL,)).fetchone()
    out = tmp_path / "report.html"
    assert audit_cli(["report", "--dsn", dsn, "--model", MODEL, "--since", "1h", "--out", str(out)]) == 0
    assert re.search(rf"^{held} records from host=127\.0\.0\.1 .* -> ", capsys.readouterr().out)
    with headless_chromium() as browser:
        page = browser.new_page()
        page.goto(out.as_uri())
        rows = page.locator("#records tbody tr.record")
        assert rows.count() == held
        overlays = page.locator('img.thumb[alt="overlay"]')  # heatmap (bytea) over the stored input (bytea)
        assert overlays.count() == held
        loaded = page.evaluate("Array.from(document.querySelectorAll('img.thumb')).every(i => i.naturalWidth > 0)")
        assert loaded
        assert page.locator("#summary").inner_text().startswith(f"{held} records")
        assert page.locator("circle.faithfulness-point").count() == held


# ------------------------------------------------------------------------------------------------ drift
def solid(colour: tuple[int, int, int], seed: int) -> bytes:
    """A 48x64 image of one colour (+-2 noise, so that each is a new input). The archive's random-init model
    (seed 0) calls red class_6 and blue class_1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    picture = np.clip(np.array(colour, dtype=np.int16) + rng.integers(-2, 3, (48, 64, 3)), 0, 255)
    return encode(picture.astype(np.uint8))


def scraped(server: serve.Server) -> dict[tuple[str, tuple], float]:
    from test_prometheus import parse_scrape

    text = requests.get(f"{server.url('metrics')}/metrics", timeout=30).text
    _, samples = parse_scrape(text)
    return {(name, tuple(sorted((k, v) for k, v in labels.items() if k != "Hostname"))): value
            for name, labels, value in samples if labels.get("ModelName") == MODEL}  # fmt: skip


def test_drift_metrics_count_what_was_audited(pg_server) -> None:
    server, dsn = pg_server
    red = ("AuditTopClass", (("Class", "class_6"), ("ModelName", MODEL)))
    faith = ("AuditFaithfulness_count", (("ModelName", MODEL),))
    mass = ("AuditTop10Mass_count", (("ModelName", MODEL),))
    before = scraped(server)
    images = [solid((255, 0, 0), seed=i) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: requests.post(f"{server.url()}/predictions/{MODEL}", data=b,
                                                        headers=server.headers(), timeout=120), images))  # fmt: skip
    assert all(a.status_code == 200 and a.json()["predictions"][0]["label"] == "class_6" for a in answers)
    deadline = time.monotonic() + 20  # the frontend reads the workers' metric lines asynchronously
    while True:
        after = scraped(server)
        grown = {key: after.get(key, 0) - before.get(key, 0) for key in (red, faith, mass)}
        if all(v >= 8 for v in grown.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert grown == {red: 8, faith: 8, mass: 8}
    with psycopg.connect(dsn) as connection:  # the histogram's sum is the records' faithfulness, summed
        (total,) = connection.execute("SELECT sum(faithfulness) FROM audit_records WHERE request_id = ANY(%s)",
                                      ([a.headers["x-request-id"] for a in answers],)).fetchone()  # fmt: skip
    faith_sum = ("AuditFaithfulness_sum", (("ModelName", MODEL),))
    assert after[faith_sum] - before.get(faith_sum, 0) == pytest.approx(total, abs=1e-4)
    assert after[("AuditDriftFaithfulnessFloor", (("ModelName", MODEL),))] == 0.05  # the config's defaults
    assert after[("AuditDriftShareShift", (("ModelName", MODEL),))] == 0.2


@pytest.mark.skipif(not os.environ.get("CAM_DRIFT_DEMO"), reason="the live drift demo (~2 min): CAM_DRIFT_DEMO=1")
def test_drift_demo_alert_fires_on_scraped_metrics(postgres, tmp_path: Path) -> None:
    """The real EfficientNet-Lite0 behind its own TorchServe, auditing into PostgreSQL; a real Prometheus scrapes
    it every second and evaluates the shipped class-share rule, its windows scaled down (1 h -> 30 s, 1 d offset
    1 h -> 60 s offset 30 s): skimage's cat photo for 70 s, then its coffee photo; the expression goes from no
    sample (0) to 1."""
    import shutil
    import subprocess

    import numpy as np
    import yaml
    from PIL import Image
    from skimage import data
    from test_audit_drift import RULES, _promtool

    from tests.helpers.postgres import dies_with_parent

    _promtool()
    prometheus = shutil.which("prometheus")
    dsn = postgres.database("drift")
    name = "drift_lite0"
    spec = ArchiveSpec(config="efficientnet_lite0", archive_name=name,
                       overrides={"handler": {"audit": {"enabled": True, "sink": "postgres", "dsn": dsn,
                                                        "faithfulness": True}}})  # fmt: skip
    workdir = tmp_path / "ts"
    build_archive(spec, workdir / "model_store", log=lambda line: None)
    ports = {api: serve.free_port() for api in serve.PORT_VARIABLES}
    server = serve.start(workdir, workdir / "model_store", [name], ports=ports, timeout=240)
    rules = yaml.safe_load(RULES.read_text())["spec"]
    scale = [("[1h]", "[30s]"), ("[1d] offset 1h", "[60s] offset 30s"), ("for: 15m", "for: 0s")]
    text = yaml.safe_dump(rules)
    for old, new in scale:
        text = text.replace(old, new)
    (tmp_path / "rules.yaml").write_text(text)
    port = serve.free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [{"job_name": "torchserve", "static_configs": [
            {"targets": [f"127.0.0.1:{server.ports['metrics']}"]}]}],
    }))  # fmt: skip
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - closed below
    command = [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
               f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    # dies with this test process however it ends (a kill -9 or a timeout skips the finally below)
    process = subprocess.Popen(dies_with_parent(command, "SIGKILL"), stdout=subprocess.DEVNULL, stderr=log,
                               start_new_session=True)  # fmt: skip
    expression = next(r for r in rules["groups"][0]["rules"] if r["alert"] == "AuditClassShareShift")["expr"]
    for old, new in scale:
        expression = expression.replace(old, new)
    timeline: list[tuple[float, str, int]] = []

    def fired() -> int:
        answer = requests.get(f"http://127.0.0.1:{port}/api/v1/query",
                              params={"query": f"count({expression}) > 0"}, timeout=10).json()  # fmt: skip
        return int(float(answer["data"]["result"][0]["value"][1])) if answer["data"]["result"] else 0

    def photo(picture: np.ndarray):
        small = np.asarray(Image.fromarray(picture).resize((224, 150)), dtype=np.int16)

        def make(seed: int) -> bytes:  # +-2 noise: every request a new input (a new sha256)
            noise = np.random.default_rng(seed).integers(-2, 3, small.shape)
            return encode(np.clip(small + noise, 0, 255).astype(np.uint8))

        return make

    started = time.monotonic()
    labels: dict[str, set[str]] = {}

    def drive(make, seconds: float, phase: str, seed: int) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            answer = requests.post(f"{server.url()}/predictions/{name}", data=make(seed), headers=server.headers(),
                                   timeout=60)  # fmt: skip
            answer.raise_for_status()
            labels.setdefault(phase, set()).add(answer.json()["predictions"][0]["label"])
            seed += 1
            if not timeline or time.monotonic() - started - timeline[-1][0] >= 5:
                timeline.append((time.monotonic() - started, phase, fired()))
            time.sleep(0.2)

    try:
        drive(photo(data.chelsea()), 70, "cat photo", 10_000)
        before = fired()
        drive(photo(data.coffee()), 40, "coffee photo", 20_000)
        after = fired()
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()
        serve.stop(workdir)
    print(f"\ntop-1 classes: {labels}")
    print("\n".join(f"{t:5.1f} s  {phase:13s} alert expression {value}" for t, phase, value in timeline))
    assert before == 0 and after >= 1, timeline  # both classes moved: the cat down, espresso up (2 series)
