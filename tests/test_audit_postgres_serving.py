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
from tests.helpers.inputs import encode, square_image
from tests.helpers.serving import AUDIT_LABELS

MODEL = "audit_pg"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def pg_server(postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[serve.Server, str]]:
    dsn = postgres.database("served")
    workdir = tmp_path_factory.mktemp("ts-pg")
    spec = ArchiveSpec(
        config={"handler": {"architecture": "timm/test_efficientnet", "target_layers": ["bn2"]}},
        archive_name=MODEL,
        allow_random_weights=True,
        overrides={
            "minWorkers": 2, "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 20, "responseTimeout": 120,
            "handler": {"labels": AUDIT_LABELS, "preprocessing": {"input_size": [64, 64]}, "top_k": 3,
                        "audit": {"enabled": True, "sink": "postgres", "durability": "strict", "store_inputs": True,
                                  "faithfulness": True}},
        },
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
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: `make test` installs Debian's chromium (tests/ensure_chromium.sh)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    server, dsn = pg_server
    answers = send(server, 6, seed=2000, threads=3)
    assert [a.status_code for a in answers] == [200] * 6
    with psycopg.connect(dsn) as connection:
        (held,) = connection.execute("SELECT count(*) FROM audit_records WHERE model = %s", (MODEL,)).fetchone()
    out = tmp_path / "report.html"
    assert audit_cli(["report", "--dsn", dsn, "--model", MODEL, "--since", "1h", "--out", str(out)]) == 0
    assert re.search(rf"^{held} records from host=127\.0\.0\.1 .* -> ", capsys.readouterr().out)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
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
        finally:
            browser.close()
