"""Versioned schema migrations of the audit databases (SQLite here, PostgreSQL in :mod:`handlers.audit.postgres`).

A database records the migrations applied to it in ``schema_version`` (one row per version, with the
UTC time it was applied). A sink applies the missing ones when it opens (``python -m handlers.audit
migrate`` does the same by hand); a database newer than this code is refused rather than written with
an older idea of its schema.

SQLite's history: version 1 is the first released table, version 2 added ``endpoint``, version 3 made
``record_id`` unique (a retried write cannot duplicate a record). Databases created before
``schema_version`` existed are recognised by their columns (1 without ``endpoint``, 2 with it).
"""

from __future__ import annotations

import sqlite3

__all__ = ["SQLITE_MIGRATIONS", "SQLITE_VERSION", "migrate_sqlite", "sqlite_version", "SchemaTooNew"]


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer release than this one."""


SQLITE_V1 = """
CREATE TABLE IF NOT EXISTS audit_records (
    id INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL,
    request_id TEXT,
    timestamp TEXT NOT NULL,
    epoch REAL NOT NULL,
    model TEXT NOT NULL,
    version TEXT,
    weights TEXT,
    input_sha256 TEXT NOT NULL,
    input_bytes INTEGER,
    image_width INTEGER,
    image_height INTEGER,
    explained INTEGER,
    predictions TEXT,
    top_index INTEGER,
    top_label TEXT,
    top_score REAL,
    method TEXT,
    layers TEXT,
    targets TEXT,
    peak_x INTEGER,
    peak_y INTEGER,
    top10_mass REAL,
    entropy REAL,
    faithfulness REAL,
    faithfulness_ms REAL,
    heatmap_path TEXT,
    input_path TEXT,
    explanations TEXT,
    batch_size INTEGER,
    worker_pid INTEGER
);
CREATE INDEX IF NOT EXISTS audit_records_model_epoch ON audit_records (model, epoch);
CREATE INDEX IF NOT EXISTS audit_records_request ON audit_records (request_id);
"""

#: (version, SQL script), in order
SQLITE_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, SQLITE_V1),
    (2, "ALTER TABLE audit_records ADD COLUMN endpoint TEXT;"),
    (3, "CREATE UNIQUE INDEX IF NOT EXISTS audit_records_record_id ON audit_records (record_id);"),
)
SQLITE_VERSION = SQLITE_MIGRATIONS[-1][0]
VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"


def sqlite_version(connection: sqlite3.Connection) -> int:
    """The schema version of a SQLite audit database: 0 when empty; legacy databases by their columns."""
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "schema_version" in tables:
        row = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
        if row and row[0] is not None:
            return int(row[0])
    if "audit_records" not in tables:
        return 0
    columns = {row[1] for row in connection.execute("PRAGMA table_info(audit_records)")}
    return 2 if "endpoint" in columns else 1


def migrate_sqlite(connection: sqlite3.Connection) -> list[int]:
    """Apply the missing migrations in one ``BEGIN IMMEDIATE`` transaction (so that two workers starting
    together do not both apply them); the versions applied. ``connection``: autocommit
    (``isolation_level=None``)."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        current = sqlite_version(connection)
        if current > SQLITE_VERSION:
            raise SchemaTooNew(f"audit database at schema version {current}; this release knows {SQLITE_VERSION}")
        connection.execute(VERSION_TABLE)
        applied = []
        for version, script in SQLITE_MIGRATIONS:
            if version <= current:
                continue
            for statement in filter(str.strip, script.split(";")):
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                (version,),
            )
            applied.append(version)
        connection.execute("COMMIT")
        return applied
    except BaseException:
        connection.execute("ROLLBACK")
        raise
