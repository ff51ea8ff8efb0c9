"""Prediction auditing: a durable record of what a sample of live predictions looked at.

For every audited request (a ``sample_rate`` share of the valid requests of a model whose config has
``handler.audit.enabled: true``) one record is written:

- request id (TorchServe's ``x-request-id``), UTC timestamp, model name, version and weights source;
- SHA-256 and length of the submitted image bytes, image width and height;
- the response's top-k results (class predictions, detections, a mask's classes, similarities);
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

Durability ``async`` (default): a record is queued before its answer leaves the handler and committed
(WAL, ``synchronous=NORMAL``: survives SIGKILL and OOM kills, not a power cut) as soon as the writer
thread reaches it; records queued meanwhile share a transaction. ``strict``: the batch's records are
committed (``synchronous=FULL``) before the handler returns its answers; the README gives the cost.
SIGTERM and exit drain the queue (at most 10 s); ``torchserve --stop`` closes the workers' sockets ~2 s
later (``sys.exit`` drains too). An answer replaced for its size leaves no record. A full disk or bad
directory never fails a prediction: records are dropped, logged and counted (``AuditWriteErrors``).

``python -m handlers.audit report --since 24h --model NAME [--db PATH] [--out report.html]`` renders
a self-contained HTML report (see :mod:`handlers.audit_report`).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import datetime as dt
import hashlib
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cam_engine.core import model_scores
from cam_engine.image import to_uint8
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


#: where each task's answer lists its results, and the fields of its best one (index, label, score)
_ANSWER_LISTS = {
    "predictions": ("index", "label", "score"),  # classifiers, CLIP
    "detections": ("class", "label", "score"),
    "classes": ("index", "label", "fraction"),  # segmentation: the classes of the mask, largest first
    "similarities": (None, "concept", "similarity"),  # embeddings
}
_PICTURES = ("heatmap", "overlay", "method", "layers")


def _answer_list(body: Mapping[str, Any]) -> tuple[str | None, Any]:
    """(key, list) of the task's results in a response body: class predictions, detections, ..."""
    return next(((key, body[key]) for key in _ANSWER_LISTS if key in body), (None, None))


def _top_fields(entry: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``index``/``label``/``score`` of a response's best result (``key``: the list it came from)."""
    index, label, score = (entry.get(k) if k else None for k in _ANSWER_LISTS[key])
    return {
        "index": index if isinstance(index, int) and not isinstance(index, bool) else None,
        "label": label if isinstance(label, str) else None,
        "score": score if isinstance(score, (int, float)) and not isinstance(score, bool) else None,
    }


def _subject(explanation: Mapping[str, Any]) -> dict[str, Any]:
    """What one explanation of a response is about (its target, box or concept), without the pictures:
    ``{"target": ..., "label": ..., **the task's own fields}``."""
    fields = {k: v for k, v in explanation.items() if k not in _PICTURES}
    target = fields.pop("target", None)
    if "box_index" in fields:
        target = fields.pop("box_index")
    elif "concept" in fields:
        fields["kind"] = target
        target = fields.pop("concept")
    return {"target": target, "label": fields.pop("label", None), **fields}


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
            connection.execute(f"PRAGMA synchronous={getattr(self, 'synchronous', 'NORMAL')}")  # FULL: strict
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
        from .base import metrics_cache

        found = metrics_cache(context)
        if found is None:
            return
        cache, MetricTypes = found
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
            sink.synchronous = "FULL" if self.config.durability == "strict" else "NORMAL"
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
            if self.config.durability == "strict" and not self.writer.flush(SHUTDOWN_FLUSH_S):
                self._warn_once("strict", f"audit records of {self.handler.model_name} not committed in time")
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
            kind, predictions = _answer_list(body)
            predictions = list(predictions[: self.config.top_k]) if isinstance(predictions, list) else []
            top = _top_fields(predictions[0], kind) if predictions and isinstance(predictions[0], Mapping) else {}
            subjects = [_subject(e) for e in body.get("explanations") or [] if isinstance(e, Mapping)]
            meta = handler.explanation_meta(request)
            fields: dict[str, Any] = {
                "record_id": uuid.uuid4().hex,
                "request_id": _request_id(context, getattr(request, "request_index", request.index)),
                "timestamp": stamp,
                "epoch": epoch,
                "model": handler.model_name,
                "version": handler.version,
                "weights": handler.weights_source,
                "image_width": int(request.image.shape[-1]),
                "image_height": int(request.image.shape[-2]),
                "explained": bool(request.explain),
                "predictions": predictions,
                "top_index": top.get("index"),
                "top_label": top.get("label"),
                "top_score": top.get("score"),
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
                    if described["label"] is None and position < len(subjects):  # the answer names it
                        described = subjects[position]
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
    from .audit_report import load_records, parse_since, render_report

    try:
        since = parse_since(args.since)
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
