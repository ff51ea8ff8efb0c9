"""Where audit records go: the SQLite sink (with heatmap and input files beside it) and the stdout
sink (JSON lines in the model log), and the records' columns (:data:`COLUMNS`, :data:`JSON_COLUMNS`);
the PostgreSQL sink is :mod:`handlers.audit.postgres`, the tables' versions :mod:`handlers.audit.migrations`.

Sinks are used by the writer thread only (:mod:`handlers.audit.writer`); ``write`` takes a list of
:class:`PendingRecord`, already summarised by the writer's ``prepare``, and finishes them off (hash, PNGs
unless already encoded, files) before storing them. A sink may also
offer ``check()`` (is it writable?), ``prune(cutoff_epoch)`` (delete older records with their files),
``errors`` (the exception types its calls raise) and ``transient(error)`` (worth retrying).
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

from .migrations import migrate_sqlite

__all__ = [
    "PendingRecord", "SqliteSink", "StdoutSink", "resolve_directory", "COLUMNS", "JSON_COLUMNS", "DB_NAME",
    "input_extension", "finish_record",
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


COLUMNS = (
    "record_id", "request_id", "timestamp", "epoch", "model", "version", "weights", "input_sha256",
    "input_bytes", "image_width", "image_height", "explained", "endpoint", "predictions", "top_index", "top_label",
    "top_score", "method", "layers", "targets", "peak_x", "peak_y", "top10_mass", "entropy",
    "faithfulness", "faithfulness_ms", "heatmap_path", "input_path", "explanations", "batch_size", "worker_pid",
)  # fmt: skip
JSON_COLUMNS = ("predictions", "layers", "targets", "explanations")


@dataclass
class PendingRecord:
    """A record on its way to the sink: the fields computed on the request path, plus what the writer
    finishes off it (summaries, hash, PNGs, files).

    ``cams``: the model-input CAMs ``[T, H, W]`` (CPU, detached) and ``geometry`` their request's
    :class:`~handlers.serving.preprocess.Geometry`, which the writer maps onto the submitted image and
    summarises (:func:`handlers.audit.summary.summarise`, which drops them); ``heatmaps``: uint8
    ``[T, h, w]``, or ``pngs``: those encoded (what the sinks store)."""

    fields: dict[str, Any]
    raw: bytes
    heatmaps: np.ndarray | None = None
    store_input: bool = False
    committed: bool | None = None  # set by the writer: True once committed, False once lost
    cams: Any = None  # torch.Tensor [T, H, W]
    geometry: Any = None
    pngs: list[bytes] | None = None

    def heatmap_pngs(self) -> list[bytes]:
        """The heatmaps as PNGs (encoded once; the arrays are dropped)."""
        if self.pngs is None:
            self.pngs = [] if self.heatmaps is None else [encode_png(heatmap) for heatmap in self.heatmaps]
            self.heatmaps = None
        return self.pngs


def input_extension(raw: bytes) -> str:
    if raw.startswith(b"\x89PNG"):
        return "png"
    if raw.startswith(b"\xff\xd8"):
        return "jpg"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "webp"
    return "bin"


def finish_record(record: PendingRecord) -> dict[str, Any]:
    """The writer's share of the work: hash of the input bytes."""
    fields = record.fields
    fields["input_sha256"] = hashlib.sha256(record.raw).hexdigest()
    fields["input_bytes"] = len(record.raw)
    return fields


class SqliteSink:
    """``<directory>/audit.sqlite3`` (WAL) with heatmaps and inputs as files beside it:
    ``heatmaps/<model>/<YYYY-MM-DD>/<record_id>_<target>.png``, ``inputs/<model>/<YYYY-MM-DD>/<record_id>.<ext>``.

    ``synchronous``: ``FULL`` (strict) or ``NORMAL``; ``busy_timeout_ms``: the longest a write waits for
    another process's lock before it fails. One machine only: every replica would write its own file."""

    name = "sqlite"
    errors = (sqlite3.Error,)

    def __init__(self, directory: Path, synchronous: str = "NORMAL", busy_timeout_ms: int = 2000) -> None:
        self.directory = Path(directory)
        self.database = self.directory / DB_NAME
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self._connection: sqlite3.Connection | None = None

    @staticmethod
    def transient(error: BaseException) -> bool:
        """A lock held by another process: worth another try."""
        return isinstance(error, sqlite3.OperationalError) and ("locked" in str(error) or "busy" in str(error))

    def open(self) -> None:
        if self._connection is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # Opened at load (to report a bad directory at once), then used by the writer thread only.
        connection = sqlite3.connect(
            self.database, timeout=self.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={self.synchronous}")  # FULL: strict
            migrate_sqlite(connection)
        except (sqlite3.Error, RuntimeError):
            connection.close()
            raise
        self._connection = connection

    def check(self) -> None:
        """Raise unless a write transaction can start now (the lock is free, the file writable)."""
        self.open()
        self._connection.execute("BEGIN IMMEDIATE")
        self._connection.execute("ROLLBACK")

    def write(self, records: list[PendingRecord]) -> None:
        if self._connection is None:
            self.open()
        rows = []
        for record in records:
            fields = finish_record(record)
            day = fields["timestamp"][:10]
            model = re.sub(r"[^A-Za-z0-9_.-]", "_", fields["model"])
            pngs = record.heatmap_pngs()
            if pngs:
                folder = self.directory / "heatmaps" / model / day
                folder.mkdir(parents=True, exist_ok=True)
                for position, png in enumerate(pngs):
                    relative = f"heatmaps/{model}/{day}/{fields['record_id']}_{position}.png"
                    (folder / f"{fields['record_id']}_{position}.png").write_bytes(png)
                    if position < len(fields["explanations"]):
                        fields["explanations"][position]["heatmap_path"] = relative
                    if position == 0:
                        fields["heatmap_path"] = relative
            if record.store_input:
                folder = self.directory / "inputs" / model / day
                folder.mkdir(parents=True, exist_ok=True)
                name = f"{fields['record_id']}.{input_extension(record.raw)}"
                (folder / name).write_bytes(record.raw)
                fields["input_path"] = f"inputs/{model}/{day}/{name}"
            rows.append(
                tuple(json.dumps(fields.get(c)) if c in JSON_COLUMNS else fields.get(c) for c in COLUMNS)
            )
        connection = self._connection
        try:
            connection.execute("BEGIN")
            connection.executemany(
                f"INSERT OR IGNORE INTO audit_records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", rows
            )
            connection.execute("COMMIT")
        except sqlite3.Error:
            self.close()
            raise

    def prune(self, cutoff: float, model: str | None = None) -> int:
        """Delete the records older than ``cutoff`` (epoch; of ``model`` only, if given) and their heatmap
        and input files; empty day folders go too. The number of records deleted."""
        self.open()
        connection = self._connection
        where, arguments = "epoch < ?", list[Any]([cutoff])
        if model:
            where, arguments = where + " AND model = ?", [cutoff, model]
        rows = connection.execute(
            f"SELECT heatmap_path, input_path, explanations FROM audit_records WHERE {where}", arguments
        ).fetchall()
        files: set[str] = set()
        for heatmap_path, input_path, explanations in rows:
            files.update(p for p in (heatmap_path, input_path) if p)
            for explanation in json.loads(explanations or "[]") or []:
                if isinstance(explanation, dict) and explanation.get("heatmap_path"):
                    files.add(explanation["heatmap_path"])
        connection.execute("BEGIN IMMEDIATE")
        try:
            deleted = connection.execute(f"DELETE FROM audit_records WHERE {where}", arguments).rowcount
            connection.execute("COMMIT")
        except sqlite3.Error:
            connection.execute("ROLLBACK")
            raise
        folders = set()
        for relative in files:  # after the commit: a crash in between leaves files, never rows without files
            path = self.directory / relative
            if path.resolve().is_relative_to(self.directory.resolve()):
                path.unlink(missing_ok=True)
                folders.add(path.parent)
        for folder in folders:
            try:
                folder.rmdir()  # only when empty: the day's other records keep theirs
            except OSError:
                pass
        return deleted

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
            fields = finish_record(record)
            for position, png in enumerate(record.heatmap_pngs()):
                if position < len(fields["explanations"]):
                    fields["explanations"][position]["heatmap_png"] = base64.b64encode(png).decode("ascii")
            lines.append(json.dumps({"type": "cam_audit_record", **fields}, separators=(",", ":")))
        stream = self.stream or sys.stdout
        stream.write("\n".join(lines) + "\n")  # one write call: lines do not interleave with log lines
        stream.flush()

    def close(self) -> None:
        pass
