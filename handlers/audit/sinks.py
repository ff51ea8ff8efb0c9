"""Where audit records go: the SQLite sink (with heatmap and input files beside it) and the stdout
sink (JSON lines in the model log), and the records' schema (:data:`COLUMNS`, :data:`JSON_COLUMNS`).

Both sinks are used by the writer thread only (:mod:`handlers.audit.writer`); ``write`` takes a list
of :class:`PendingRecord` and finishes them off (hash, PNGs, files) before storing them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlers.serving.codec import encode_png

__all__ = [
    "PendingRecord", "SqliteSink", "StdoutSink", "resolve_directory", "COLUMNS", "JSON_COLUMNS", "DB_NAME", "SCHEMA",
]  # fmt: skip

DB_NAME = "audit.sqlite3"


def resolve_directory(configured: str | None) -> Path:
    """The audit directory: ``configured`` with ``~``/``$VARS`` expanded, else ``$CAM_AUDIT_DIR``, else
    ``$LOG_LOCATION/audit``, else ``/tmp/torchserve-cam-audit``. Raises ValueError if not absolute."""
    if configured:
        path = Path(os.path.expandvars(os.path.expanduser(configured)))
    elif os.environ.get("CAM_AUDIT_DIR"):
        path = Path(os.environ["CAM_AUDIT_DIR"])
    elif os.environ.get("LOG_LOCATION"):
        path = Path(os.environ["LOG_LOCATION"]) / "audit"
    else:
        path = Path("/tmp/torchserve-cam-audit")
    if not path.is_absolute():
        # A worker runs inside the model's temporary unpack directory, deleted on stop.
        raise ValueError(f"handler.audit.directory: {str(path)!r} must be absolute (after expanding ~ and $VARS)")
    return path


SCHEMA = """
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
    endpoint TEXT,
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
COLUMNS = (
    "record_id", "request_id", "timestamp", "epoch", "model", "version", "weights", "input_sha256",
    "input_bytes", "image_width", "image_height", "explained", "endpoint", "predictions", "top_index", "top_label",
    "top_score", "method", "layers", "targets", "peak_x", "peak_y", "top10_mass", "entropy",
    "faithfulness", "faithfulness_ms", "heatmap_path", "input_path", "explanations", "batch_size", "worker_pid",
)  # fmt: skip
JSON_COLUMNS = ("predictions", "layers", "targets", "explanations")


def _add_missing_columns(connection: sqlite3.Connection) -> None:
    """Columns added to :data:`SCHEMA` since a database was created (``endpoint``) are added to it."""
    existing = {row[1] for row in connection.execute("PRAGMA table_info(audit_records)")}
    declared = dict(re.findall(r"^\s+(\w+) (\w+)", SCHEMA.split("CREATE INDEX")[0], re.MULTILINE))
    for column in COLUMNS:
        if column not in existing:
            connection.execute(f"ALTER TABLE audit_records ADD COLUMN {column} {declared[column]}")


@dataclass
class PendingRecord:
    """A record on its way to the sink: the fields computed on the request path, plus what the writer
    finishes off it (hash, PNGs, files). ``heatmaps``: uint8 ``[T, h, w]`` or None."""

    fields: dict[str, Any]
    raw: bytes
    heatmaps: np.ndarray | None = None
    store_input: bool = False


def _input_extension(raw: bytes) -> str:
    if raw.startswith(b"\x89PNG"):
        return "png"
    if raw.startswith(b"\xff\xd8"):
        return "jpg"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "webp"
    return "bin"


def _finish(record: PendingRecord) -> dict[str, Any]:
    """The writer's share of the work: hash of the input bytes."""
    fields = record.fields
    fields["input_sha256"] = hashlib.sha256(record.raw).hexdigest()
    fields["input_bytes"] = len(record.raw)
    return fields


class SqliteSink:
    """``<directory>/audit.sqlite3`` (WAL) with heatmaps and inputs as files beside it:
    ``heatmaps/<model>/<YYYY-MM-DD>/<record_id>_<target>.png``, ``inputs/<model>/<YYYY-MM-DD>/<record_id>.<ext>``."""

    name = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.database = self.directory / DB_NAME
        self._connection: sqlite3.Connection | None = None

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # Opened at load (to report a bad directory at once), then used by the writer thread only.
        connection = sqlite3.connect(self.database, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={getattr(self, 'synchronous', 'NORMAL')}")  # FULL: strict
            connection.executescript(SCHEMA)
            _add_missing_columns(connection)
        except sqlite3.Error:
            connection.close()
            raise
        self._connection = connection

    def write(self, records: list[PendingRecord]) -> None:
        if self._connection is None:
            self.open()
        rows = []
        for record in records:
            fields = _finish(record)
            day = fields["timestamp"][:10]
            model = re.sub(r"[^A-Za-z0-9_.-]", "_", fields["model"])
            if record.heatmaps is not None:
                folder = self.directory / "heatmaps" / model / day
                folder.mkdir(parents=True, exist_ok=True)
                for position, heatmap in enumerate(record.heatmaps):
                    relative = f"heatmaps/{model}/{day}/{fields['record_id']}_{position}.png"
                    (folder / f"{fields['record_id']}_{position}.png").write_bytes(encode_png(heatmap))
                    if position < len(fields["explanations"]):
                        fields["explanations"][position]["heatmap_path"] = relative
                    if position == 0:
                        fields["heatmap_path"] = relative
            if record.store_input:
                folder = self.directory / "inputs" / model / day
                folder.mkdir(parents=True, exist_ok=True)
                name = f"{fields['record_id']}.{_input_extension(record.raw)}"
                (folder / name).write_bytes(record.raw)
                fields["input_path"] = f"inputs/{model}/{day}/{name}"
            rows.append(
                tuple(json.dumps(fields.get(c)) if c in JSON_COLUMNS else fields.get(c) for c in COLUMNS)
            )
        connection = self._connection
        try:
            connection.execute("BEGIN")
            connection.executemany(
                f"INSERT INTO audit_records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", rows
            )
            connection.execute("COMMIT")
        except sqlite3.Error:
            self.close()
            raise

    def close(self) -> None:
        if self._connection is not None:
            try:
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                self._connection.close()
            except sqlite3.Error:
                pass
            self._connection = None

    def __repr__(self) -> str:
        return f"SqliteSink({str(self.database)!r})"


class StdoutSink:
    """One JSON line per record on the worker's stdout (``{"type": "cam_audit_record", ...}``).

    TorchServe copies a worker's stdout into its model log (prefixed ``... MODEL_LOG - ``); a log
    pipeline takes the JSON after the prefix. Heatmaps, when stored, travel base64-encoded in
    ``explanations[i].heatmap_png``. Raw inputs never go to the log (the config refuses it).
    """

    name = "stdout"

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream

    def open(self) -> None:
        pass

    def write(self, records: list[PendingRecord]) -> None:
        lines = []
        for record in records:
            fields = _finish(record)
            if record.heatmaps is not None:
                for position, heatmap in enumerate(record.heatmaps):
                    if position < len(fields["explanations"]):
                        fields["explanations"][position]["heatmap_png"] = base64.b64encode(encode_png(heatmap)).decode("ascii")
            lines.append(json.dumps({"type": "cam_audit_record", **fields}, separators=(",", ":")))
        stream = self.stream or sys.stdout
        stream.write("\n".join(lines) + "\n")  # one write call: lines do not interleave with log lines
        stream.flush()

    def close(self) -> None:
        pass
