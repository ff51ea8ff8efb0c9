"""The PostgreSQL audit sink in-process against a real server (fixture ``postgres``, one per session):
strict and async, a server restart under load, fail-closed strict answers and the status marker, migrations
(SQLite from its first released schema, PostgreSQL), prune and retention on both sinks, the CLI.

Every test takes a database of its own. The multi-worker and ``kill -9`` tests against TorchServe are in
``tests/test_audit_postgres_serving.py``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from test_audit import call, make_handler

from handlers.audit import PendingRecord, SqliteSink
from handlers.audit.__main__ import main as audit_cli
from handlers.audit.migrations import SQLITE_V1, SQLITE_VERSION, SchemaTooNew, sqlite_version
from handlers.audit.postgres import POSTGRES_VERSION, PostgresSink, migrate_postgres
from tests.helpers.fake_context import FakeContext
from tests.helpers.inputs import encode, square_image

pytestmark = pytest.mark.usefixtures("postgres")


def pg_rows(dsn: str, query: str = "SELECT * FROM audit_records ORDER BY id", arguments=()) -> list[dict]:
    from psycopg.rows import dict_row

    with psycopg.connect(dsn, row_factory=dict_row) as connection:
        return list(connection.execute(query, arguments))


def handle(handler, images: list[bytes], explain: list[bool]) -> tuple[list[dict], dict]:
    context = FakeContext(Path(handler.context.system_properties["model_dir"]), handler.model_name, explain)
    answers = [json.loads(r) for r in handler.handle([{"body": bytearray(b)} for b in images], context)]
    return answers, context.status


def cli(*argv: str, capsys) -> str:
    """``python -m handlers.audit ARGV`` in-process (the interpreter is already warm): its stdout."""
    assert audit_cli(list(argv)) == 0
    return capsys.readouterr().out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("durability", ["strict", "async"])
def test_postgres_sink_writes_the_sqlite_schema_with_jsonb_and_bytea_heatmaps(postgres, tmp_path, durability) -> None:
    dsn = postgres.database()
    handler = make_handler(tmp_path / "model", {"sink": "postgres", "dsn": dsn, "durability": durability,
                                                "store_inputs": True, "faithfulness": True}, name=f"pg_{durability}")  # fmt: skip
    sink = handler.audit.writer.sink
    write = sink.write

    def slow(records):  # the writer's transaction takes 0.4 s: async answers leave before it commits
        time.sleep(0.4)
        write(records)

    sink.write = slow
    images = [encode(square_image(30, 40, (2, 2, 12, 12), seed=i)) for i in range(3)]
    try:
        answers = call(handler, images, [True, False, True])
        committed_when_answered = len(pg_rows(dsn))
        assert handler.audit.flush()
    finally:
        handler.audit.close()
    assert all(a["predictions"] for a in answers)
    assert committed_when_answered == (3 if durability == "strict" else 0)
    records = pg_rows(dsn)
    assert sorted(r["input_sha256"] for r in records) == sorted(map(sha, images))
    for record in records:
        assert isinstance(record["predictions"], list) and record["predictions"][0]["label"].startswith("class_")
        assert record["top_label"] == record["predictions"][0]["label"] and record["explained"] in (True, False)
        assert record["faithfulness"] == pytest.approx(record["explanations"][0]["faithfulness"]["drop"])
    # one heatmap per explained target, a PNG of the submitted image's size; inputs byte for byte
    heatmaps = pg_rows(dsn, "SELECT h.record_id, h.png, r.image_width, r.image_height FROM audit_heatmaps h "
                            "JOIN audit_records r USING (record_id)")  # fmt: skip
    assert len(heatmaps) == 3  # every audited request gets its top-1 heatmap, explained or not
    import io

    from PIL import Image

    for row in heatmaps:
        picture = Image.open(io.BytesIO(bytes(row["png"])))
        assert picture.format == "PNG" and picture.size == (row["image_width"], row["image_height"])
    stored = {sha(bytes(r["data"])) for r in pg_rows(dsn, "SELECT data FROM audit_inputs")}
    assert stored == set(map(sha, images))
    settings = pg_rows(dsn, "SELECT count(*) AS n FROM schema_version WHERE version = %s", (POSTGRES_VERSION,))
    assert settings[0]["n"] == 1


def _load(handler, stop: threading.Event, seed0: int, out: list, limit: int = 400, deadline_s: float = 60) -> None:
    """Batches of 2 unique images until ``stop`` (bounded): (sha256, status, monotonic time) per image."""
    end = time.monotonic() + deadline_s
    seed = seed0
    while not stop.is_set() and len(out) < limit and time.monotonic() < end:
        images = [encode(square_image(20, 20, (2, 2, 8, 8), seed=seed + i)) for i in range(2)]
        seed += 2
        answers, status = handle(handler, images, [False, False])
        now = time.monotonic()
        for index, image in enumerate(images):
            out.append((sha(image), status.get(index, (200, ""))[0], answers[index], now))
        time.sleep(0.02)


def test_postgres_restart_mid_load_strict_refuses_async_retries(postgres, tmp_path, monkeypatch) -> None:
    """The server stops for ~2 s under load. Strict: 503 AuditUnavailable while it is down, the status
    marker up, every 200 answer recorded, 200s again after it, the marker gone without traffic.
    Async: every answer 200; the records lost are at most those the writer counted (here: none)."""
    monkeypatch.setenv("CAM_STATUS_DIR", str(tmp_path))
    dsns = {"strict": postgres.database(), "async": postgres.database()}
    handlers = {mode: make_handler(tmp_path / mode, {"sink": "postgres", "dsn": dsns[mode], "durability": mode,
                                                     "busy_timeout_ms": 500, "store_heatmaps": False},
                                   name=f"pg_load_{mode}") for mode in dsns}  # fmt: skip
    marker = tmp_path / "audit-unavailable-pg_load_strict"
    results: dict[str, list] = {mode: [] for mode in dsns}
    stop = threading.Event()
    threads = [threading.Thread(target=_load, args=(handlers[m], stop, 1000 * i, results[m])) for i, m in enumerate(dsns)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        down_at = time.monotonic()
        postgres.stop("fast")
        time.sleep(2.0)
        marker_during = marker.read_text() if marker.exists() else None
        postgres.start()
        up_at = time.monotonic()
        time.sleep(4.0)  # the writers reconnect; more load after the outage
        stop.set()
        for thread in threads:
            thread.join(60)
        # strict: no traffic now; the idle health check clears the marker (bounded wait)
        for _ in range(100):
            if not marker.exists():
                break
            time.sleep(0.1)
        marker_after = marker.exists()
        assert handlers["async"].audit.flush(30)
        counts = {mode: handlers[mode].audit.writer.counters() for mode in dsns}
    finally:
        stop.set()
        for handler in handlers.values():
            handler.audit.close()
    strict, loose = results["strict"], results["async"]
    refused = [r for r in strict if r[1] == 503]
    assert refused and all(r[2]["type"] == "AuditUnavailable" for r in refused)
    assert all(down_at - 0.5 <= r[3] <= up_at + 3.0 for r in refused), "503 outside the outage"
    assert any(r[1] == 200 and r[3] > up_at + 1.0 for r in strict), "strict did not recover"
    assert {r[1] for r in strict} <= {200, 503}
    recorded = {r["input_sha256"] for r in pg_rows(dsns["strict"])}
    answered = {r[0] for r in strict if r[1] == 200}
    assert answered <= recorded, f"{len(answered - recorded)} answers released without a record"
    assert marker_during and "postgres" in marker_during.lower() and not marker_after
    assert {r[1] for r in loose} == {200}
    kept = {r["input_sha256"] for r in pg_rows(dsns["async"])}
    lost = {r[0] for r in loose} - kept
    assert len(lost) <= counts["async"]["write_errors"] + counts["async"]["dropped"]
    assert counts["async"]["committed"] == len(kept) and not lost, (counts, len(lost))


def test_strict_answers_503_when_the_database_is_unreachable_and_async_serves(postgres, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAM_STATUS_DIR", str(tmp_path))
    dead = f"host=127.0.0.1 port={postgres.port + 1 if postgres.port < 65535 else 1} user=postgres dbname=none"
    image = encode(square_image(20, 20, (2, 2, 8, 8), seed=5))
    for mode in ("strict", "async"):
        handler = make_handler(tmp_path / mode, {"sink": "postgres", "dsn": dead, "durability": mode, "busy_timeout_ms": 300},
                               name=f"pg_dead_{mode}")  # fmt: skip
        try:
            started = time.monotonic()
            answers, status = handle(handler, [image, image], [True, False])
            took = time.monotonic() - started
        finally:
            handler.audit.writer.retry = False
            handler.audit.close(); handler.audit.writer.flush(1)  # noqa: E702
        if mode == "strict":
            assert status == {0: (503, "Service Unavailable"), 1: (503, "Service Unavailable")}
            assert [a["type"] for a in answers] == ["AuditUnavailable"] * 2 and "strict" in answers[0]["message"]
            assert took < 2 * 0.3 + 1.0 + 5, took  # bounded by busy_timeout_ms, not a 10-30 s stall
            assert (tmp_path / "audit-unavailable-pg_dead_strict").exists()
        else:
            assert status == {} and "explanations" in answers[0] and answers[1]["predictions"]
            assert not (tmp_path / "audit-unavailable-pg_dead_async").exists()


def test_strict_sqlite_locked_by_another_process_fails_closed_within_the_busy_timeout(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAM_STATUS_DIR", str(tmp_path))
    directory = tmp_path / "audit"
    handler = make_handler(tmp_path / "model", {"directory": str(directory), "durability": "strict",
                                                "busy_timeout_ms": 200}, name="locked")  # fmt: skip
    image = encode(square_image(20, 20, (2, 2, 8, 8), seed=6))
    blocker = sqlite3.connect(directory / "audit.sqlite3", isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        answers, status = handle(handler, [image], [False])
        took = time.monotonic() - started
        marker_seen = (tmp_path / "audit-unavailable-locked").read_text()
        blocker.execute("ROLLBACK")
        answers_after, status_after = handle(handler, [image], [False])
    finally:
        blocker.close()
        handler.audit.close()
    assert status == {0: (503, "Service Unavailable")} and answers[0]["type"] == "AuditUnavailable"
    assert took < 1.4, took  # 2 x 200 ms + 1 s at most, not SQLite's old 30 s timeout
    assert "locked" in marker_seen
    assert status_after == {} and answers_after[0]["predictions"]
    assert not (tmp_path / "audit-unavailable-locked").exists()


# ------------------------------------------------------------------------------------------------ migrations
def test_sqlite_database_of_the_first_release_is_migrated_and_keeps_its_rows(tmp_path, capsys) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    legacy = sqlite3.connect(directory / "audit.sqlite3")
    legacy.executescript(SQLITE_V1)  # the table as first released: no endpoint, no schema_version
    legacy.execute("INSERT INTO audit_records (record_id, timestamp, epoch, model, input_sha256) VALUES ('r1', 't', 1.0, 'm', 'x')")
    legacy.commit()
    assert sqlite_version(legacy) == 1
    legacy.close()
    assert cli("migrate", "--db", str(directory / "audit.sqlite3"), capsys=capsys).endswith("applied [2, 3]\n")
    connection = sqlite3.connect(directory / "audit.sqlite3")
    try:
        assert [r[0] for r in connection.execute("SELECT version FROM schema_version ORDER BY version")] == [2, 3]
        assert sqlite_version(connection) == SQLITE_VERSION
        assert connection.execute("SELECT record_id, endpoint FROM audit_records").fetchall() == [("r1", None)]
        with pytest.raises(sqlite3.IntegrityError):  # version 3: record ids are unique
            connection.execute("INSERT INTO audit_records (record_id, timestamp, epoch, model, input_sha256) "
                               "VALUES ('r1', 't', 2.0, 'm', 'y')")  # fmt: skip
        connection.execute("INSERT INTO schema_version VALUES (99, 'later')")
        connection.commit()
    finally:
        connection.close()
    with pytest.raises(SchemaTooNew, match="99"):  # a database from a newer release is not written
        SqliteSink(directory).open()


def test_postgres_migration_runs_once_among_racing_workers_and_refuses_newer(postgres) -> None:
    dsn = postgres.database()
    applied: list[list[int]] = []

    def migrate() -> None:
        with psycopg.connect(dsn) as connection:
            applied.append(migrate_postgres(connection))

    threads = [threading.Thread(target=migrate) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(applied) == [[], [], list(range(1, POSTGRES_VERSION + 1))]
    with psycopg.connect(dsn) as connection:
        connection.execute("INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(SchemaTooNew, match="99"):
        PostgresSink(dsn).open()


def test_postgres_database_of_an_older_schema_is_migrated_and_keeps_its_rows(postgres, monkeypatch, capsys) -> None:
    """A database a release with schema 1 wrote, opened by a release with a second migration (a stand-in: this
    release has only version 1): `migrate --dsn` applies just the new step, once, and the rows stay."""
    import handlers.audit.postgres as pg

    dsn = postgres.database("older")
    sink = PostgresSink(dsn)
    sink.open()
    sink.write([_record("kept", time.time())])
    sink.close()
    newer = (*pg.POSTGRES_MIGRATIONS, (pg.POSTGRES_VERSION + 1, "ALTER TABLE audit_records ADD COLUMN reviewer TEXT"))
    monkeypatch.setattr(pg, "POSTGRES_MIGRATIONS", newer)
    monkeypatch.setattr(pg, "POSTGRES_VERSION", pg.POSTGRES_VERSION + 1)
    assert cli("migrate", "--dsn", dsn, capsys=capsys).endswith(f"applied [{pg.POSTGRES_VERSION}]\n")
    assert cli("migrate", "--dsn", dsn, capsys=capsys).endswith("up to date\n")  # nothing twice
    rows = pg_rows(dsn)
    assert [(r["record_id"], r["reviewer"]) for r in rows] == [("kept", None)]
    versions = pg_rows(dsn, "SELECT version FROM schema_version ORDER BY version")
    assert [v["version"] for v in versions] == list(range(1, pg.POSTGRES_VERSION + 1))


# ------------------------------------------------------------------------------------------------ prune
def _record(record_id: str, epoch: float, targets: int = 2) -> PendingRecord:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(epoch))
    fields = {"record_id": record_id, "timestamp": stamp, "epoch": epoch, "model": "m", "explanations": [
        {"target": t} for t in range(targets)], "predictions": [], "layers": [], "targets": []}  # fmt: skip
    heatmaps = np.full((targets, 6, 8), 7, dtype=np.uint8)
    return PendingRecord(fields, record_id.encode(), heatmaps, store_input=True)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_prune_removes_rows_and_heatmaps_older_than_the_cutoff_and_nothing_else(postgres, tmp_path, kind, capsys) -> None:
    now = time.time()
    ages = {"old1": 40, "old2": 31, "new1": 29, "new2": 0}  # days
    if kind == "sqlite":
        sink, target = SqliteSink(tmp_path / "audit"), ["--db", str(tmp_path / "audit" / "audit.sqlite3")]
    else:
        dsn = postgres.database()
        sink, target = PostgresSink(dsn), ["--dsn", dsn]
    sink.write([_record(name, now - days * 86400) for name, days in ages.items()])
    sink.close()
    files_before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png")) if kind == "sqlite" else []
    assert "pruned 2 record(s) older than 30d" in cli("prune", "--older-than", "30d", *target, capsys=capsys)
    if kind == "sqlite":
        connection = sqlite3.connect(tmp_path / "audit" / "audit.sqlite3")
        left = sorted(r[0] for r in connection.execute("SELECT record_id FROM audit_records"))
        connection.close()
        files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".png", ".bin"))
        assert len(files_before) == 8
        assert files == ["new1.bin", "new1_0.png", "new1_1.png", "new2.bin", "new2_0.png", "new2_1.png"]
        assert not any("old" in p.name for p in tmp_path.rglob("*"))  # the old days' folders went too
    else:
        left = sorted(r["record_id"] for r in pg_rows(dsn))
        heatmaps = pg_rows(dsn, "SELECT record_id, count(*) AS n FROM audit_heatmaps GROUP BY record_id ORDER BY 1")
        assert [(r["record_id"], r["n"]) for r in heatmaps] == [("new1", 2), ("new2", 2)]
        assert sorted(r["record_id"] for r in pg_rows(dsn, "SELECT record_id FROM audit_inputs")) == ["new1", "new2"]
    assert left == ["new1", "new2"]


def test_retention_days_prunes_in_the_writer(tmp_path) -> None:
    directory = tmp_path / "audit"
    sink = SqliteSink(directory)
    sink.write([_record("ancient", time.time() - 10 * 86400)])
    sink.close()
    handler = make_handler(tmp_path / "model", {"directory": str(directory), "retention_days": 7}, name="retained")
    try:
        call(handler, [encode(square_image(20, 20, (2, 2, 8, 8), seed=8))], [False])
        assert handler.audit.flush()
        pruned = handler.audit.writer.pruned
    finally:
        handler.audit.close()
    connection = sqlite3.connect(directory / "audit.sqlite3")
    ids = [r[0] for r in connection.execute("SELECT record_id FROM audit_records")]
    connection.close()
    assert pruned == 1 and "ancient" not in ids and len(ids) == 1
    assert not list(directory.rglob("ancient*"))


def test_cam_audit_sink_moves_an_sqlite_archive_to_postgres(postgres, tmp_path, monkeypatch) -> None:
    """What the Kubernetes component audit-postgres sets: $CAM_AUDIT_SINK=postgres and $CAM_AUDIT_DSN from a
    Secret; an archive built for SQLite then writes to PostgreSQL, and no SQLite file appears."""
    dsn = postgres.database("envsink")
    monkeypatch.setenv("CAM_AUDIT_SINK", "postgres")
    monkeypatch.setenv("CAM_AUDIT_DSN", dsn)
    directory = tmp_path / "audit"
    handler = make_handler(tmp_path / "model", {"directory": str(directory), "durability": "strict"}, name="env_pg")
    images = [encode(square_image(30, 40, (2, 2, 12, 12), seed=40 + i)) for i in range(2)]
    try:
        assert handler.audit.config.sink == "postgres" and handler.audit.writer.sink.name == "postgres"
        call(handler, images, [True, False])
        assert sorted(r["input_sha256"] for r in pg_rows(dsn)) == sorted(map(sha, images))  # strict: committed
    finally:
        handler.audit.close()
    assert not (directory / "audit.sqlite3").exists()


@pytest.mark.parametrize("value, audit, message", [
    ("mysql", {}, "not a sink; choose one of sqlite, stdout, postgres"),
    ("stdout", {"store_inputs": True}, "store_inputs is on"),
])  # fmt: skip
def test_cam_audit_sink_refuses_what_the_config_would(tmp_path, monkeypatch, value, audit, message) -> None:
    monkeypatch.setenv("CAM_AUDIT_SINK", value)
    with pytest.raises(ValueError, match=message):
        make_handler(tmp_path / "model", {"directory": str(tmp_path / "audit"), **audit}, name="env_bad")
