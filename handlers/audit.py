"""Prediction auditing: a durable record of what a sample of live predictions looked at.

For every audited request (a ``sample_rate`` share of the valid requests of a model whose config has
``handler.audit.enabled: true``) one record is written:

- request id (TorchServe's ``x-request-id``), UTC timestamp, model name, version and weights source;
- SHA-256 and length of the submitted image bytes, image width and height;
- the response's top-k predictions;
- method, layers and targets of the heatmap;
- a heatmap summary per target, computed on the heatmap mapped onto the submitted image: the peak
  position in image pixels, the share of the heatmap's mass held by its top 10% of pixels, and its
  normalised entropy ``-sum(p log p) / log(n)`` with ``p = heatmap / sum(heatmap)`` over n pixels
  (1 = spread evenly, 0 = one pixel);
- optionally the heatmap as an 8-bit PNG (``store_heatmaps``) and the image bytes (``store_inputs``);
- optionally a faithfulness score (``faithfulness``): the drop in target confidence (softmax
  probability for classifiers) when the top 20% of the heatmap's pixels are removed from the model
  input (set to 0 after normalisation, i.e. the mean colour), with the cost of that check in ms.

How it runs (:class:`Auditor`, one per handler):

1. :meth:`Auditor.sample` marks the sampled requests of a batch before the batched run. An audited
   request that asked for no explanation rides along in the same ``cam.run`` with the task's default
   targets (a classifier's top-1 class), so it costs a backward pass for its image but no forward
   pass; its response stays as it was (no ``explanations``).
2. :meth:`Auditor.record`, called after the batch's responses are built, computes the summaries on
   the device, runs one extra batched forward pass for the faithfulness check of all audited
   (image, target) pairs, copies the heatmaps to the host once and queues the records. It never
   raises: a failure is logged and counted.
3. A background writer thread takes what is queued, hashes, encodes PNGs, writes the files and
   inserts the records in one SQLite transaction (or prints JSON lines), then commits. Nothing on
   the request path waits for the disk.

Durability: a record is queued before its response leaves the handler and committed as soon as the
writer reaches it (no timer: under load, records queued meanwhile share the next transaction). In WAL
mode with ``synchronous=NORMAL`` a commit survives a crash of the process (SIGKILL, OOM kill), not
a power cut. On SIGTERM and on interpreter exit the queue is drained first (at most 10 s).
``torchserve --stop`` does not give workers a SIGTERM: the frontend closes their sockets (the worker
then exits through ``sys.exit``, which drains the queue) or kills them; either happens ~2 s after the
command, by which time records of answered requests are long committed. A record can be lost only
if the worker is killed in the few milliseconds between queueing and commit. A full disk or an
unwritable directory never fails a prediction: the records are dropped, the error is logged (first
time, then at most every 30 s) and counted in the ``AuditWriteErrors`` metric.

``python -m handlers.audit report --since 24h --model NAME [--db PATH] [--out report.html]`` renders
a self-contained HTML report (see :func:`render_report`).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import datetime as dt
import hashlib
import html
import io
import json
import logging
import math
import os
import queue
import random
import re
import signal
import sqlite3
import sys
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cam_engine.core import model_scores
from cam_engine.image import colorize, overlay, to_uint8
from cam_engine.targets import ClassifierOutputTarget

from .config import AuditConfig
from .preprocess import to_source

__all__ = [
    "Auditor",
    "AuditWriter",
    "SqliteSink",
    "StdoutSink",
    "heatmap_summary",
    "remove_top_pixels",
    "resolve_directory",
    "load_records",
    "render_report",
    "main",
    "DB_NAME",
    "REMOVED_FRACTION",
    "TOP_MASS_FRACTION",
]

logger = logging.getLogger(__name__)

DB_NAME = "audit.sqlite3"
REMOVED_FRACTION = 0.2  # faithfulness: the share of heatmap pixels removed from the input
TOP_MASS_FRACTION = 0.1  # summary: the share of pixels whose mass is reported
SHUTDOWN_FLUSH_S = 10.0
ERROR_LOG_INTERVAL_S = 30.0
REOPEN_INTERVAL_S = 5.0
WRITE_BATCH = 256


# ---------------------------------------------------------------------------------------------- maths
def heatmap_summary(heatmap: torch.Tensor) -> dict[str, Any]:
    """Peak, top-10% mass share and normalised entropy of one heatmap ``[h, w]`` (values >= 0).

    ``peak_x``/``peak_y``: column/row of the maximum (the first one in row-major order);
    ``top10_mass``: ``sum of the ceil(0.1 n) largest values / sum of all``; ``entropy``:
    ``-sum(p log p) / log(n)`` with ``p = heatmap / sum(heatmap)``. Both are None for an all-zero map.
    """
    flat = heatmap.float().reshape(-1).clamp_min(0)
    count = flat.numel()
    peak = int(flat.argmax())
    width = heatmap.shape[-1]
    total = float(flat.sum())
    summary: dict[str, Any] = {"peak_x": peak % width, "peak_y": peak // width, "top10_mass": None, "entropy": None}
    if total <= 0 or count < 2:
        return summary
    top = max(1, math.ceil(TOP_MASS_FRACTION * count))
    summary["top10_mass"] = round(float(flat.topk(top).values.sum()) / total, 6)
    p = flat / total
    p = p[p > 0]
    summary["entropy"] = round(float(-(p * p.log()).sum()) / math.log(count), 6)
    return summary


def remove_top_pixels(inputs: torch.Tensor, cams: torch.Tensor, fraction: float = REMOVED_FRACTION) -> torch.Tensor:
    """Inputs ``[N, C, H, W]`` with the ``round(fraction * H * W)`` hottest pixels of ``cams`` ``[N, H, W]``
    set to 0 in every channel (after normalisation: the dataset's mean colour). Returns a new tensor."""
    count, height, width = cams.shape
    removed = max(1, round(fraction * height * width))
    hottest = cams.reshape(count, -1).float().topk(removed, dim=1).indices
    keep = torch.ones((count, height * width), dtype=inputs.dtype, device=inputs.device)
    keep.scatter_(1, hottest.to(inputs.device), 0)
    return inputs * keep.reshape(count, 1, height, width)


def _confidence(scores: Any, row: int, target: Any) -> tuple[float, str]:
    """The target's confidence in image ``row``: softmax probability for [B, C] class scores, else the raw score."""
    if isinstance(scores, torch.Tensor) and scores.ndim == 2:
        return float(target(torch.softmax(scores[row].float(), dim=-1))), "softmax"
    return float(target(scores[row])), "score"


# ---------------------------------------------------------------------------------------------- sinks
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
    "input_bytes", "image_width", "image_height", "explained", "predictions", "top_index", "top_label",
    "top_score", "method", "layers", "targets", "peak_x", "peak_y", "top10_mass", "entropy",
    "faithfulness", "faithfulness_ms", "heatmap_path", "input_path", "explanations", "batch_size", "worker_pid",
)  # fmt: skip
JSON_COLUMNS = ("predictions", "layers", "targets", "explanations")


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


def _png(gray: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


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
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(SCHEMA)
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
                    (folder / f"{fields['record_id']}_{position}.png").write_bytes(_png(heatmap))
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
                        fields["explanations"][position]["heatmap_png"] = base64.b64encode(_png(heatmap)).decode("ascii")
            lines.append(json.dumps({"type": "cam_audit_record", **fields}, separators=(",", ":")))
        stream = self.stream or sys.stdout
        stream.write("\n".join(lines) + "\n")  # one write call: lines do not interleave with log lines
        stream.flush()

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- writer
_WRITERS: weakref.WeakSet[AuditWriter] = weakref.WeakSet()
_HOOKS_LOCK = threading.Lock()
_HOOKS_INSTALLED = False


def _flush_all(timeout: float = SHUTDOWN_FLUSH_S) -> None:
    deadline = time.monotonic() + timeout
    for writer in list(_WRITERS):
        writer.flush(max(0.0, deadline - time.monotonic()))


def _install_shutdown_hooks() -> None:
    """Drain every writer's queue at interpreter exit and on SIGTERM (then let the signal act as before)."""
    global _HOOKS_INSTALLED
    with _HOOKS_LOCK:
        if _HOOKS_INSTALLED:
            return
        _HOOKS_INSTALLED = True
    atexit.register(_flush_all)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be installed from the main thread; atexit still flushes
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        _flush_all()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - embedded interpreters
        pass


class AuditWriter:
    """A background thread that commits queued records to a sink in batches, off the request path.

    :meth:`submit` never blocks: when ``queue_size`` records are waiting, the new one is dropped and
    counted. Sink errors drop the batch being written, are logged (rate-limited) and counted; the
    sink is reopened at most every 5 s.
    """

    def __init__(self, sink: Any, queue_size: int = 10_000, model_name: str = "model") -> None:
        self.sink = sink
        self.model_name = model_name
        self._queue: queue.Queue[PendingRecord | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Condition()
        self._pending = 0
        self.committed = 0
        self.write_errors = 0
        self.dropped = 0
        self.last_commit_latency_ms = 0.0  # queueing -> commit of the oldest record of the last transaction
        self.max_commit_latency_ms = 0.0
        self._sink_open = False
        self._last_open_try = -math.inf
        self._last_error_log = -math.inf
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"cam-audit-writer-{model_name}", daemon=True)
        _WRITERS.add(self)
        _install_shutdown_hooks()
        self._try_open()  # at load: an unwritable directory is reported at once, not at the first record
        self._thread.start()

    def submit(self, record: PendingRecord) -> bool:
        with self._lock:
            if self._closed:
                self.dropped += 1
                return False
            self._pending += 1
        record.fields.setdefault("_queued", time.perf_counter())
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self._pending -= 1
                self.dropped += 1
                self._lock.notify_all()
            self._log_error(f"audit queue full ({self._queue.maxsize} records): dropping records")
            return False
        return True

    def flush(self, timeout: float = SHUTDOWN_FLUSH_S) -> bool:
        """Wait until every submitted record is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._lock.wait(min(left, 0.1))
        return True

    def close(self, timeout: float = SHUTDOWN_FLUSH_S) -> None:
        self.flush(timeout)
        with self._lock:
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        self.sink.close()

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {"committed": self.committed, "write_errors": self.write_errors, "dropped": self.dropped}

    def _try_open(self) -> bool:
        if self._sink_open:
            return True
        now = time.monotonic()
        if now - self._last_open_try < REOPEN_INTERVAL_S:
            return False
        self._last_open_try = now
        try:
            self.sink.open()
        except (OSError, sqlite3.Error) as error:
            self._log_error(f"audit sink {self.sink!r} cannot be opened: {error}; records are dropped and counted")
            return False
        self._sink_open = True
        return True

    def _log_error(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            counts = self.counters()
            logger.error(
                "%s (model %s; so far %d records committed, %d lost to write errors, %d dropped)",
                message, self.model_name, counts["committed"], counts["write_errors"], counts["dropped"],
            )  # fmt: skip

    def _loop(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            batch = [item]
            while len(batch) < WRITE_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(entry is None for entry in batch)
            records = [entry for entry in batch if entry is not None]
            if not records:
                continue
            queued = [r.fields.pop("_queued", time.perf_counter()) for r in records]
            ok = False
            if self._try_open():
                try:
                    self.sink.write(records)
                    ok = True
                except (OSError, sqlite3.Error, ValueError, TypeError) as error:
                    self._sink_open = False
                    self._last_open_try = time.monotonic()
                    self._log_error(f"audit sink {self.sink!r} failed to write {len(records)} record(s): {error}")
            with self._lock:
                if ok:
                    self.committed += len(records)
                    self.last_commit_latency_ms = (time.perf_counter() - min(queued)) * 1000
                    self.max_commit_latency_ms = max(self.max_commit_latency_ms, self.last_commit_latency_ms)
                else:
                    self.write_errors += len(records)
                self._pending -= len(records)
                self._lock.notify_all()


# ---------------------------------------------------------------------------------------------- metrics
class _AuditMetrics:
    """``AuditRecords`` (committed), ``AuditWriteErrors`` (records lost to sink errors), ``AuditDropped``
    (queue full), counters by model and sink; ``AuditFaithfulnessTime`` and ``AuditOverheadTime`` (ms per
    batch on the request path), gauges. Counters are published as deltas with each batch, from the
    request thread (the writer thread never touches TorchServe's metric cache)."""

    NAMES = {"committed": "AuditRecords", "write_errors": "AuditWriteErrors", "dropped": "AuditDropped"}

    def __init__(self, context: Any, model_name: str, sink: str) -> None:
        self.dims = [model_name, sink]
        self.published = dict.fromkeys(self.NAMES, 0)
        self.counters: dict[str, Any] = {}
        self.gauges: dict[str, Any] = {}
        cache = getattr(context, "metrics", None)
        if cache is None or not hasattr(cache, "add_metric_to_cache"):
            return
        try:
            from ts.metrics.metric_type_enum import MetricTypes
        except ImportError:  # pragma: no cover - TorchServe absent
            return
        dims = ["ModelName", "Sink"]
        for key, name in self.NAMES.items():
            self.counters[key] = cache.add_metric_to_cache(name, "count", dims, MetricTypes.COUNTER)
        for name in ("AuditFaithfulnessTime", "AuditOverheadTime"):
            self.gauges[name] = cache.add_metric_to_cache(name, "ms", dims, MetricTypes.GAUGE)

    def publish(self, counts: Mapping[str, int]) -> None:
        for key, metric in self.counters.items():
            delta = counts[key] - self.published[key]
            if delta > 0:
                metric.add_or_update(delta, self.dims)
                self.published[key] = counts[key]

    def gauge(self, name: str, milliseconds: float) -> None:
        if name in self.gauges:
            self.gauges[name].add_or_update(round(milliseconds, 3), self.dims)


# ---------------------------------------------------------------------------------------------- auditor
def _utc_now() -> tuple[str, float]:
    now = time.time()
    stamp = dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return stamp, now


def _request_id(context: Any, index: int) -> str | None:
    getter = getattr(context, "get_request_id", None)
    if getter is None:
        return None
    try:
        value = getter(index)
    except (IndexError, KeyError, AttributeError, TypeError):
        return None
    return str(value) if value else None


@dataclass
class _Pair:
    """One audited (request, target): its batch row, its model-input CAM ``[H, W]`` and its target."""

    row: int
    record: int
    target: Any
    cam: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


class Auditor:
    """The audit hook of :class:`handlers.base.CamHandler` (see the module docstring).

    Disabled (``handler.audit.enabled: false``, the default), both calls return at once.
    """

    def __init__(self, handler: Any, context: Any = None, rng: random.Random | None = None) -> None:
        self.handler = handler
        self.config: AuditConfig = handler.config.audit
        self.enabled = self.config.enabled
        self.rng = rng or random.Random()
        self.writer: AuditWriter | None = None
        self._warned: set[str] = set()
        if not self.enabled:
            return
        if self.config.sink == "stdout":
            sink: Any = StdoutSink()
        else:
            sink = SqliteSink(resolve_directory(self.config.directory))
        self.metrics = _AuditMetrics(context, handler.model_name, sink.name)
        self.writer = AuditWriter(sink, self.config.queue_size, handler.model_name)
        logger.info(
            "auditing %s: %.0f%% of requests to %r (heatmaps %s, faithfulness %s, inputs %s)",
            handler.model_name, 100 * self.config.sample_rate, sink, self.config.store_heatmaps,
            self.config.faithfulness, self.config.store_inputs,
        )  # fmt: skip

    # ------------------------------------------------------------------ before the batched run
    def sample(self, requests: Sequence[Any]) -> None:
        """Mark each valid request as audited with probability ``sample_rate``.

        An audited request that asked for no explanation keeps its response unchanged; it only drops
        ``aug_smooth`` for its audit heatmap (six extra passes for a picture nobody asked for).
        """
        if not self.enabled:
            return
        rate = self.config.sample_rate
        for request in requests:
            request.audited = rate >= 1.0 or (rate > 0.0 and self.rng.random() < rate)
            if request.audited and not request.explain:
                request.aug_smooth = False

    # ------------------------------------------------------------------ after the responses are built
    def record(
        self,
        requests: Sequence[Any],
        batch: torch.Tensor,
        outputs: Any,
        cams: Sequence[torch.Tensor | None],
        bodies: Mapping[int, Mapping[str, Any]],
    ) -> None:
        """Queue one record per audited request that got a response (``bodies`` by request index).

        Never raises: an error is logged and counted, the responses go out unchanged.
        """
        if not self.enabled or self.writer is None:
            return
        started = time.perf_counter()
        try:
            self._record(requests, batch, outputs, cams, bodies)
        except Exception as error:  # noqa: BLE001 - auditing must never fail a prediction
            self._warn_once("record", f"audit record failed for model {self.handler.model_name}: {error!r}")
            with self.writer._lock:
                self.writer.write_errors += sum(bool(getattr(r, "audited", False)) for r in requests)
        finally:
            self.metrics.gauge("AuditOverheadTime", (time.perf_counter() - started) * 1000)
            self.metrics.publish(self.writer.counters())

    def _record(
        self,
        requests: Sequence[Any],
        batch: torch.Tensor,
        outputs: Any,
        cams: Sequence[torch.Tensor | None],
        bodies: Mapping[int, Mapping[str, Any]],
    ) -> None:
        handler = self.handler
        context = handler.context
        audited = [(row, r) for row, r in enumerate(requests) if getattr(r, "audited", False) and r.index in bodies]
        if not audited:
            return
        scores = model_scores(outputs)
        records: list[PendingRecord] = []
        pairs: list[_Pair] = []
        heatmap_parts: list[torch.Tensor] = []
        heatmap_owner: list[tuple[int, tuple[int, int], int]] = []  # (record, shape, count)
        stamp, epoch = _utc_now()
        layers = list(handler.config.explanation.target_layers)
        for row, request in audited:
            body = bodies[request.index]
            predictions = body.get("predictions")
            predictions = list(predictions[: self.config.top_k]) if isinstance(predictions, list) else []
            top = predictions[0] if predictions and isinstance(predictions[0], Mapping) else {}
            meta = handler.explanation_meta(request)
            fields: dict[str, Any] = {
                "record_id": uuid.uuid4().hex,
                "request_id": _request_id(context, request.index),
                "timestamp": stamp,
                "epoch": epoch,
                "model": handler.model_name,
                "version": handler.version,
                "weights": handler.weights_source,
                "image_width": int(request.image.shape[-1]),
                "image_height": int(request.image.shape[-2]),
                "explained": bool(request.explain),
                "predictions": predictions,
                "top_index": top.get("index") if isinstance(top.get("index"), int) else None,
                "top_label": top.get("label") if isinstance(top.get("label"), str) else None,
                "top_score": top.get("score") if isinstance(top.get("score"), (int, float)) else None,
                "method": meta.get("method", request.method),
                "layers": meta.get("layers", layers),
                "targets": [],
                "explanations": [],
                "batch_size": len(requests),
                "worker_pid": os.getpid(),
            }
            request_cams = cams[row] if row < len(cams) else None
            if request_cams is not None:
                targets = list(handler.targets_for(request))[: request_cams.shape[0]]
                mapped = to_source(request_cams, request.geometry)  # [T, h, w] in [0, 1]
                for position, target in enumerate(targets):
                    resolved, described = self._describe_target(target, scores, row)
                    summary = heatmap_summary(mapped[position])
                    fields["targets"].append(described)
                    fields["explanations"].append({**described, **summary})
                    pairs.append(_Pair(row, len(records), resolved, request_cams[position], fields["explanations"][-1]))
                if targets and self.config.store_heatmaps:
                    pictures = to_uint8(mapped[: len(targets)])
                    heatmap_owner.append((len(records), tuple(pictures.shape[1:]), pictures.shape[0]))
                    heatmap_parts.append(pictures.reshape(-1))
                if fields["explanations"]:
                    first = fields["explanations"][0]
                    fields.update({k: first[k] for k in ("peak_x", "peak_y", "top10_mass", "entropy")})
            records.append(PendingRecord(fields, bytes(request.raw), None, self.config.store_inputs))
        if self.config.faithfulness and pairs:
            self._faithfulness(batch, scores, pairs, records)
        if heatmap_parts:
            host = torch.cat(heatmap_parts).cpu().numpy()  # one device-to-host copy for the batch
            offset = 0
            for index, shape, count in heatmap_owner:
                size = count * shape[0] * shape[1]
                records[index].heatmaps = host[offset : offset + size].reshape(count, *shape)
                offset += size
        for record in records:
            self.writer.submit(record)

    def _describe_target(self, target: Any, scores: Any, row: int) -> tuple[Any, dict[str, Any]]:
        """(a target fixed to a class where it named "the top class", its JSON description)."""
        labels = self.handler.labels
        index = getattr(target, "category", None)
        if index is None and type(target).__name__ == "TopClassTarget" and isinstance(scores, torch.Tensor):
            index = int(scores[row].reshape(-1).argmax())
            target = ClassifierOutputTarget(index)
        if isinstance(index, int):
            label = labels[index] if 0 <= index < len(labels) else None
            return target, {"target": index, "label": label}
        return target, {"target": repr(target), "label": None}

    def _faithfulness(
        self, batch: torch.Tensor, scores: Any, pairs: list[_Pair], records: list[PendingRecord]
    ) -> None:
        """One extra forward pass for every audited (image, target): confidence before and after
        removing the top 20% of its heatmap. Its cost (ms) goes into each record of the batch."""
        started = time.perf_counter()
        try:
            rows = torch.tensor([p.row for p in pairs], device=batch.device)
            cam_stack = torch.stack([p.cam.to(batch.device) for p in pairs])
            perturbed = remove_top_pixels(batch[rows], cam_stack)
            with torch.inference_mode():
                perturbed_scores = model_scores(self.handler.model(perturbed))
            results = []
            for position, pair in enumerate(pairs):
                before, basis = _confidence(scores, pair.row, pair.target)
                after, _ = _confidence(perturbed_scores, position, pair.target)
                results.append((before, after, basis))
            if batch.device.type == "cuda":
                torch.cuda.synchronize(batch.device)
        except Exception as error:  # noqa: BLE001 - a task whose outputs do not fit: no score, no failure
            self._warn_once("faithfulness", f"faithfulness check skipped for {self.handler.model_name}: {error!r}")
            return
        cost = (time.perf_counter() - started) * 1000
        for pair, (before, after, basis) in zip(pairs, results):
            pair.info["faithfulness"] = {
                "before": round(before, 6), "after": round(after, 6), "drop": round(before - after, 6), "basis": basis,
            }  # fmt: skip
        for record in records:
            explanations = record.fields["explanations"]
            if explanations and "faithfulness" in explanations[0]:
                record.fields["faithfulness"] = explanations[0]["faithfulness"]["drop"]
                record.fields["faithfulness_ms"] = round(cost, 3)
        self.metrics.gauge("AuditFaithfulnessTime", cost)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.error(message)

    def flush(self, timeout: float = SHUTDOWN_FLUSH_S) -> bool:
        return self.writer.flush(timeout) if self.writer is not None else True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------- report
def _parse_since(value: str | None, now: float | None = None) -> float:
    """``30m``, ``24h``, ``7d``, ``90s`` (before now) or an ISO date/time (UTC unless it says) -> epoch."""
    now = time.time() if now is None else now
    if not value:
        return now - 24 * 3600
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return now - float(match.group(1)) * unit
    try:
        moment = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since: {value!r} is neither a duration (30m, 24h, 7d) nor an ISO date/time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def load_records(
    db: Path | None = None,
    jsonl: Path | None = None,
    since: float = 0.0,
    model: str | None = None,
    limit: int = 2000,
) -> list[dict[str, Any]]:
    """Records newer than ``since`` (epoch), newest first, from the SQLite sink or a JSON-lines log."""
    records: list[dict[str, Any]] = []
    if db is not None:
        connection = sqlite3.connect(f"file:{Path(db)}?mode=ro", uri=True, timeout=30)
        connection.row_factory = sqlite3.Row
        try:
            query = "SELECT * FROM audit_records WHERE epoch >= ?"
            arguments: list[Any] = [since]
            if model:
                query += " AND model = ?"
                arguments.append(model)
            query += " ORDER BY epoch DESC, id DESC LIMIT ?"
            arguments.append(limit)
            for row in connection.execute(query, arguments):
                record = dict(row)
                for column in JSON_COLUMNS:
                    record[column] = json.loads(record[column]) if record[column] else []
                records.append(record)
        finally:
            connection.close()
    if jsonl is not None:
        for line in Path(jsonl).read_text(errors="replace").splitlines():
            start = line.find('{"type":"cam_audit_record"')
            if start < 0:
                continue
            try:
                record = json.loads(line[start:])
            except ValueError:
                continue
            if record.get("epoch", 0) >= since and (not model or record.get("model") == model):
                records.append(record)
        records.sort(key=lambda r: r.get("epoch", 0), reverse=True)
        records = records[:limit]
    return records


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _thumbnail(record: Mapping[str, Any], root: Path | None, size: int = 112) -> tuple[str | None, str]:
    """(a PNG data URI of the overlay - or of the colour-mapped heatmap when no input is stored -, its kind)."""
    from PIL import Image, ImageOps

    explanations = record.get("explanations") or []
    heatmap_png: bytes | None = None
    if explanations and explanations[0].get("heatmap_png"):
        heatmap_png = base64.b64decode(explanations[0]["heatmap_png"])
    elif root is not None and record.get("heatmap_path") and (root / record["heatmap_path"]).is_file():
        heatmap_png = (root / record["heatmap_path"]).read_bytes()
    if heatmap_png is None:
        return None, "none"
    heatmap = Image.open(io.BytesIO(heatmap_png)).convert("L")
    heatmap.thumbnail((size, size))
    cam = torch.from_numpy(np.asarray(heatmap, dtype=np.float32) / 255.0)
    kind = "heatmap"
    picture = colorize(cam).numpy()
    if root is not None and record.get("input_path") and (root / record["input_path"]).is_file():
        try:
            image = ImageOps.exif_transpose(Image.open(root / record["input_path"])).convert("RGB")
            image = image.resize(heatmap.size, Image.Resampling.BILINEAR)
            picture = overlay(torch.from_numpy(np.asarray(image).copy()), cam).numpy()
            kind = "overlay"
        except OSError:
            pass
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", optimize=True)
    return _data_uri(buffer.getvalue()), kind


PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
OTHER_COLOUR = "#bab0ac"


def _time_label(epoch: float, span: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    return moment.strftime("%H:%M:%S" if span < 3600 else "%m-%d %H:%M" if span < 3 * 86400 else "%Y-%m-%d")


def _mix_svg(records: Sequence[Mapping[str, Any]], buckets: int = 20) -> str:
    """Stacked bars: the top-1 class mix per time bucket (top 8 classes, the rest as "other")."""
    width, height, left, bottom, top_pad = 720, 260, 44, 36, 10
    if not records:
        return '<svg id="mix-plot" width="720" height="40"><text x="8" y="24">no records</text></svg>'
    epochs = [r["epoch"] for r in records]
    start, end = min(epochs), max(epochs)
    span = max(end - start, 1e-6)
    buckets = max(1, min(buckets, len(records)))
    counts = Counter(r.get("top_label") or "?" for r in records)
    named = [label for label, _ in counts.most_common(len(PALETTE) - 1)]
    colour = {label: PALETTE[i] for i, label in enumerate(named)}
    table = [Counter() for _ in range(buckets)]
    for r in records:
        slot = min(buckets - 1, int((r["epoch"] - start) / span * buckets))
        label = r.get("top_label") or "?"
        table[slot][label if label in colour else "other"] += 1
    tallest = max(sum(c.values()) for c in table)
    plot_w, plot_h = width - left - 150, height - bottom - top_pad
    bar_w = plot_w / buckets
    parts = [f'<svg id="mix-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             '<title>Prediction mix (top-1 class) over time</title>',
             f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}" stroke="#333"/>',
             f'<text x="{left - 6}" y="{top_pad + 10}" text-anchor="end" font-size="11">{tallest}</text>',
             f'<text x="{left - 6}" y="{top_pad + plot_h}" text-anchor="end" font-size="11">0</text>']  # fmt: skip
    for slot, bucket in enumerate(table):
        y = top_pad + plot_h
        for label in [*named, "other"]:
            n = bucket.get(label, 0)
            if not n:
                continue
            h = n / tallest * plot_h
            y -= h
            parts.append(
                f'<rect class="mix-bar" x="{left + slot * bar_w + 1:.1f}" y="{y:.1f}" width="{max(bar_w - 2, 1):.1f}" '
                f'height="{h:.1f}" fill="{colour.get(label, OTHER_COLOUR)}"><title>{html.escape(label)}: {n}</title></rect>'
            )
    for slot in (0, buckets // 2, buckets - 1) if buckets > 2 else range(buckets):
        x = left + (slot + 0.5) * bar_w
        label = _time_label(start + (slot + 0.5) / buckets * span, span)
        parts.append(f'<text x="{x:.1f}" y="{height - 14}" text-anchor="middle" font-size="11">{label}</text>')
    for i, label in enumerate([*named, "other"] if len(counts) > len(named) else named):
        y = top_pad + 14 * i
        parts.append(f'<rect x="{width - 140}" y="{y}" width="10" height="10" fill="{colour.get(label, OTHER_COLOUR)}"/>')
        parts.append(f'<text x="{width - 124}" y="{y + 9}" font-size="11">{html.escape(label[:20])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _faithfulness_svg(records: Sequence[Mapping[str, Any]], buckets: int = 20) -> str:
    """Faithfulness (confidence drop, -1..1) of each record over time, with the per-bucket median."""
    points = [(r["epoch"], r["faithfulness"]) for r in records if isinstance(r.get("faithfulness"), (int, float))]
    if not points:
        return ('<svg id="faithfulness-plot" width="720" height="40"><text x="8" y="24">'
                "no faithfulness scores (handler.audit.faithfulness is off)</text></svg>")  # fmt: skip
    width, height, left, bottom, top_pad = 720, 260, 44, 36, 10
    plot_w, plot_h = width - left - 150, height - bottom - top_pad
    start = min(p[0] for p in points)
    span = max(max(p[0] for p in points) - start, 1e-6)

    def xy(epoch: float, value: float) -> tuple[float, float]:
        return left + (epoch - start) / span * plot_w, top_pad + (1 - (max(-1.0, min(1.0, value)) + 1) / 2) * plot_h

    parts = [f'<svg id="faithfulness-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             "<title>Faithfulness: drop in target confidence with the top 20% of the heatmap removed</title>",
             f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}" stroke="#333"/>',
             f'<line x1="{left}" y1="{xy(start, 0)[1]:.1f}" x2="{left + plot_w}" y2="{xy(start, 0)[1]:.1f}" stroke="#999" stroke-dasharray="4 3"/>']  # fmt: skip
    for value in (1, 0, -1):
        parts.append(f'<text x="{left - 6}" y="{xy(start, value)[1] + 4:.1f}" text-anchor="end" font-size="11">{value}</text>')
    for epoch, value in points:
        x, y = xy(epoch, value)
        parts.append(f'<circle class="faithfulness-point" cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#4e79a7" fill-opacity="0.6"/>')
    slots: dict[int, list[float]] = {}
    for epoch, value in points:
        slots.setdefault(min(buckets - 1, int((epoch - start) / span * buckets)), []).append(value)
    line = [xy(start + (slot + 0.5) / buckets * span, float(np.median(values))) for slot, values in sorted(slots.items())]
    if len(line) > 1:
        parts.append('<polyline fill="none" stroke="#e15759" stroke-width="2" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in line) + '"/>')  # fmt: skip
    parts.append(f'<text x="{width - 140}" y="{top_pad + 10}" font-size="11" fill="#e15759">median per bucket</text>')
    parts.append(f'<text x="{width - 140}" y="{top_pad + 26}" font-size="11" fill="#4e79a7">one record</text>')
    for epoch in (start, start + span / 2, start + span):
        parts.append(
            f'<text x="{xy(epoch, 0)[0]:.1f}" y="{height - 14}" text-anchor="middle" font-size="11">{_time_label(epoch, span)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


REPORT_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px} h2{font-size:16px;margin-top:28px}
figure{display:inline-block;margin:0 24px 12px 0} figcaption{font-size:13px;color:#555}
table{border-collapse:collapse;font-size:12px} th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:middle}
th{background:#f4f4f4;position:sticky;top:0} td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:11px} .filters{margin:12px 0;font-size:14px} .filters label{margin-right:16px}
img.thumb{display:block;max-width:112px;max-height:112px;image-rendering:auto}
.muted{color:#888}
"""

REPORT_SCRIPT = """
(function(){
  var cls=document.getElementById('class-filter'), lo=document.getElementById('min-confidence'),
      hi=document.getElementById('max-confidence'), shown=document.getElementById('shown-count');
  var rows=Array.prototype.slice.call(document.querySelectorAll('#records tbody tr.record'));
  function apply(){
    var want=cls.value, min=parseFloat(lo.value), max=parseFloat(hi.value), n=0;
    if(isNaN(min)) min=0; if(isNaN(max)) max=1;
    rows.forEach(function(row){
      var score=parseFloat(row.getAttribute('data-score'));
      var ok=(!want||row.getAttribute('data-label')===want)&&(isNaN(score)?min<=0:(score>=min&&score<=max));
      row.style.display=ok?'':'none'; if(ok) n++;
    });
    shown.textContent=n+' of '+rows.length+' records shown';
  }
  [cls,lo,hi].forEach(function(el){el.addEventListener('input',apply);el.addEventListener('change',apply);});
  apply();
})();
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return '<span class="muted">-</span>'
    if isinstance(value, float):
        return f"{round(value, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.000"
    return html.escape(str(value))


def render_report(records: Sequence[Mapping[str, Any]], root: Path | None, title: str = "Prediction audit") -> str:
    """A self-contained HTML page (no external asset: thumbnails are data URIs, plots inline SVG).

    Sections: summary; the prediction mix (top-1 class) over time; the faithfulness distribution over
    time; a table of records (newest first) with overlay thumbnails (the heatmap over the stored input,
    or the colour-mapped heatmap alone when inputs are not stored) and filters by class and confidence.
    ``root``: the audit directory that relative heatmap/input paths start from.
    """
    records = list(records)
    ordered = sorted(records, key=lambda r: r.get("epoch", 0))
    labels = sorted({r.get("top_label") for r in records if r.get("top_label")})
    models = sorted({f"{r.get('model')} {r.get('version')}" for r in records})
    span = ""
    if records:
        span = f"from {ordered[0]['timestamp']} to {ordered[-1]['timestamp']}"
    faith = [r["faithfulness"] for r in records if isinstance(r.get("faithfulness"), (int, float))]
    faith_text = (
        f"faithfulness: median drop {np.median(faith):.3f} over {len(faith)} scored records" if faith else "no faithfulness scores"
    )
    rows = []
    for record in records:
        thumb, kind = _thumbnail(record, root)
        image = (f'<img class="thumb" alt="{kind}" title="{kind}" src="{thumb}">' if thumb
                 else '<span class="muted">no heatmap stored</span>')  # fmt: skip
        targets = ", ".join(
            f"{t.get('target')}" + (f" ({t['label']})" if t.get("label") else "") for t in record.get("targets") or []
        )
        peak = (f"({record['peak_x']}, {record['peak_y']})" if record.get("peak_x") is not None else None)
        score = record.get("top_score")
        rows.append(
            f'<tr class="record" data-label="{html.escape(record.get("top_label") or "", quote=True)}" '
            f'data-score="{"" if score is None else score}">'
            f"<td>{image}</td><td>{_fmt(record.get('timestamp'))}<br><code>{_fmt(record.get('request_id'))}</code></td>"
            f"<td>{_fmt(record.get('model'))} {_fmt(record.get('version'))}</td>"
            f"<td>{_fmt(record.get('top_label'))}</td><td class=\"num\">{_fmt(score)}</td>"
            f"<td>{_fmt(record.get('method'))}<br><span class=\"muted\">{_fmt(', '.join(record.get('layers') or []))}</span></td>"
            f"<td>{html.escape(targets) or _fmt(None)}</td><td>{_fmt(peak)}</td>"
            f"<td class=\"num\">{_fmt(record.get('top10_mass'))}</td><td class=\"num\">{_fmt(record.get('entropy'))}</td>"
            f"<td class=\"num\">{_fmt(record.get('faithfulness'))}</td>"
            f"<td>{record.get('image_width')}x{record.get('image_height')}<br><code title=\"{_fmt(record.get('input_sha256'))}\">"
            f"{_fmt((record.get('input_sha256') or '')[:12])}</code></td></tr>"
        )
    options = "".join(f'<option value="{html.escape(label, quote=True)}">{html.escape(label)}</option>' for label in labels)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{html.escape(title)}</title><style>{REPORT_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p id="summary">{len(records)} records {html.escape(span)} &middot; {html.escape(", ".join(models))} &middot; {html.escape(faith_text)}</p>
<h2>Over time</h2>
<figure>{_mix_svg(ordered)}<figcaption>Prediction mix: top-1 class of the audited requests per time bucket</figcaption></figure>
<figure>{_faithfulness_svg(ordered)}<figcaption>Faithfulness: drop in target confidence when the top 20% of the heatmap is removed</figcaption></figure>
<h2>Records</h2>
<div class="filters">
<label>class <select id="class-filter"><option value="">all classes</option>{options}</select></label>
<label>confidence from <input id="min-confidence" type="number" min="0" max="1" step="0.05" value="0"></label>
<label>to <input id="max-confidence" type="number" min="0" max="1" step="0.05" value="1"></label>
<span id="shown-count"></span></div>
<table id="records"><thead><tr><th>overlay</th><th>time (UTC) / request id</th><th>model</th><th>top-1</th><th>score</th>
<th>method / layers</th><th>targets</th><th>peak (x, y)</th><th>top-10% mass</th><th>entropy</th><th>faithfulness</th>
<th>image / sha256</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<script>{REPORT_SCRIPT}</script>
</body></html>
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers.audit", description="Prediction audit tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="render a self-contained HTML report of audit records")
    report.add_argument("--since", default="24h", help="30m, 24h, 7d or an ISO date/time (UTC); default 24h")
    report.add_argument("--model", default=None, help="only this model (default: every model)")
    source = report.add_mutually_exclusive_group()
    source.add_argument("--db", type=Path, help=f"the SQLite sink (default: $CAM_AUDIT_DIR/{DB_NAME})")
    source.add_argument("--jsonl", type=Path, help="a log file holding the stdout sink's JSON lines")
    report.add_argument("--limit", type=int, default=2000, help="newest records shown at most (default 2000)")
    report.add_argument("--out", type=Path, default=Path("audit_report.html"), help="output HTML file")
    args = parser.parse_args(argv)
    try:
        since = _parse_since(args.since)
    except ValueError as error:
        parser.error(str(error))
    db = args.db
    if db is None and args.jsonl is None:
        db = resolve_directory(None) / DB_NAME
    if db is not None and not Path(db).is_file():
        print(f"no audit database at {db}", file=sys.stderr)
        return 1
    records = load_records(db=db, jsonl=args.jsonl, since=since, model=args.model, limit=args.limit)
    root = Path(db).resolve().parent if db is not None else None
    title = f"Prediction audit: {args.model or 'all models'}"
    args.out.write_text(render_report(records, root, title), encoding="utf-8")
    print(f"{len(records)} records -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
