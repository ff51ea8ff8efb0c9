"""``handler.audit.durability: strict``: a batch's records are committed before its answers leave the handler;
answers replaced for their size leave no record."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from test_audit import make_handler, rows  # noqa: E402

from handlers.config import ConfigError, HandlerConfig  # noqa: E402
from tests.helpers.fake_context import FakeContext  # noqa: E402
from tests.helpers.inputs import encode, square_image  # noqa: E402
from tests.helpers.serving import AUDIT_ROOT, AUDIT_STRICT  # noqa: E402


def _slow_sink(handler, delay: float = 0.4) -> None:
    sink = handler.audit.writer.sink
    write = sink.write

    def slow(records):
        time.sleep(delay)
        write(records)

    sink.write = slow


def _handle(handler, bodies: list, explain: list[bool]) -> tuple[list[dict], FakeContext]:
    context = FakeContext(Path(handler.context.system_properties["model_dir"]), handler.model_name, explain)
    items = [{"body": b if isinstance(b, dict) else bytearray(b)} for b in bodies]
    return [json.loads(r) for r in handler.handle(items, context)], context


@pytest.mark.parametrize("durability", ["strict", "async"])
def test_strict_commits_before_the_answers_leave(tmp_path: Path, durability: str) -> None:
    directory = tmp_path / "audit"
    handler = make_handler(tmp_path / "model", {"directory": str(directory), "durability": durability},
                           name=f"tiny_{durability}")  # fmt: skip
    _slow_sink(handler)
    images = [encode(square_image(30, 40, (2, 2, 12, 12), seed=i)) for i in range(3)]
    try:
        answers, _ = _handle(handler, images, [True, False, True])
        committed_when_answered = len(rows(directory / "audit.sqlite3"))
        synchronous = handler.audit.writer.sink._connection.execute("PRAGMA synchronous").fetchone()[0]
        assert handler.audit.flush()
    finally:
        handler.audit.close()
    assert all(a["predictions"] for a in answers)
    if durability == "strict":
        assert committed_when_answered == 3 and synchronous == 2  # FULL
    else:  # the writer thread is still sleeping on its first transaction
        assert committed_when_answered == 0 and synchronous == 1  # NORMAL
    assert len(rows(directory / "audit.sqlite3")) == 3


def test_an_answer_replaced_for_its_size_leaves_no_record(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    config = {"directory": str(directory), "durability": "strict"}
    handler = make_handler(tmp_path / "model", config, name="tiny_limited")
    handler._response_limit = (1000, "test limit")  # a heatmap answer is larger, a prediction is not
    image = encode(square_image(200, 300, (20, 20, 120, 150), seed=1))
    try:
        answers, context = _handle(handler, [image, image], [True, False])
    finally:
        handler.audit.close()
    assert answers[0]["type"] == "ResponseTooLarge" and "1000" in answers[0]["message"]
    assert context.status == {0: (413, "Payload Too Large")}
    assert answers[1]["predictions"]
    (record,) = rows(directory / "audit.sqlite3")
    assert record["explained"] == 0


def test_durability_is_validated() -> None:
    base = {"architecture": "timm/test_efficientnet", "labels": ["a"], "target_layers": ["bn2"]}
    assert HandlerConfig.from_dict({**base, "audit": {"durability": "strict"}}).audit.durability == "strict"
    with pytest.raises(ConfigError, match="handler.audit.durability"):
        HandlerConfig.from_dict({**base, "audit": {"durability": "sometimes"}})


def test_strict_records_survive_a_sigkill_right_after_the_answers(server) -> None:
    """Real TorchServe: 6 concurrent answers, the worker killed -9 the moment the last one arrives: 6 records."""
    headers = server.headers()
    images = [encode(square_image(48, 64, (4, 4, 30, 30), seed=40 + i)) for i in range(6)]

    def call(image: bytes) -> str:
        answer = requests.post(f"{server.url()}/predictions/{AUDIT_STRICT}", data=image, headers=headers, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.headers["x-request-id"]

    described = requests.get(f"{server.url('management')}/models/{AUDIT_STRICT}", headers=server.headers("management"),
                             timeout=30).json()  # fmt: skip
    pid = int(described[0]["workers"][0]["pid"])
    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(call, images))
    os.kill(pid, signal.SIGKILL)  # no drain, no atexit: only what was committed survives
    connection = sqlite3.connect(AUDIT_ROOT / "strict" / "audit.sqlite3")
    try:
        found = {row[0] for row in connection.execute("SELECT request_id FROM audit_records")}
    finally:
        connection.close()
    assert set(ids) <= found, f"lost {len(set(ids) - found)} of {len(ids)} records"
    deadline = time.monotonic() + 120  # leave the session's server as it was: the frontend restarts the worker
    while time.monotonic() < deadline:
        workers = requests.get(f"{server.url('management')}/models/{AUDIT_STRICT}",
                               headers=server.headers("management"), timeout=30).json()[0]["workers"]  # fmt: skip
        if any(w["status"] == "READY" and int(w["pid"]) != pid for w in workers):
            break
        time.sleep(0.5)
