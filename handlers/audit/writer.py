"""The audit's writer thread: records queued on the request path are finished and committed to a sink in batches.

The request path queues what it has already computed (fields, the model-input CAMs on the CPU, the input
bytes); the writer's ``prepare`` hook finishes each record (heatmap summaries, PNGs) and its ``observe``
hook sees each finished batch once (the drift metrics), before the sink writes it. Nothing on the request
path waits for that work or for the disk, unless ``durability: strict`` waits for its batch's records
(:meth:`AuditWriter.wait`).

The queue is bounded by records (``queue_size``), not bytes: a queued record holds its input bytes (at
most TorchServe's ``max_request_size``) and its model-input CAMs (``4 x T x H x W`` bytes: 200 KB per
heatmap at 224x224), never a heatmap at the submitted image's size (the writer maps those one record at a
time). At interpreter exit and on SIGTERM every writer's queue is drained
for at most :data:`SHUTDOWN_FLUSH_S` seconds.

Failures: a batch that fails with an error the sink calls transient (a lost PostgreSQL connection) is
retried with exponential backoff for up to :data:`RETRY_WINDOW_S` in ``async`` mode, while new records
wait in the bounded queue (overflow is dropped and counted); other errors, and every error in ``strict``
mode (whose answers are waiting), count the batch's records as lost at once. With a status marker
(strict), the writer raises it on a failure and clears it on the next success; while it is raised the
writer checks the sink's health every :data:`HEALTH_INTERVAL_S` even without traffic, so readiness
comes back without a request having to fail first.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import queue
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .sinks import PendingRecord

__all__ = ["AuditWriter", "SHUTDOWN_FLUSH_S"]

logger = logging.getLogger(__name__)

SHUTDOWN_FLUSH_S = 10.0
ERROR_LOG_INTERVAL_S = 30.0
REOPEN_INTERVAL_S = 1.0
HEALTH_INTERVAL_S = 2.0
RETRY_WINDOW_S = 60.0
RETRY_MAX_DELAY_S = 5.0
WRITE_BATCH = 256
PRUNE_INTERVAL_S = 3600.0

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
    """A background thread that finishes queued records and commits them to a sink in batches, off the
    request path.

    :meth:`submit` never blocks: when ``queue_size`` records are waiting, the new one is dropped and
    counted. ``retry``: retry transient sink errors (``async``); ``marker``: an
    :class:`~handlers.audit.status.UnavailableMarker` raised while the sink cannot commit (``strict``);
    ``retention_s``: prune records older than that, at most once an hour. ``prepare(record)``: called
    once per record on this thread before its first write attempt (a record it raises on is lost and
    counted as a write error); ``observe(records)``: called once per batch with the prepared records,
    whatever the sink then does with them.
    """

    def __init__(
        self,
        sink: Any,
        queue_size: int = 10_000,
        model_name: str = "model",
        *,
        retry: bool = True,
        marker: Any = None,
        retention_s: float | None = None,
        prepare: Callable[[PendingRecord], None] | None = None,
        observe: Callable[[list[PendingRecord]], None] | None = None,
    ) -> None:
        self.sink = sink
        self.prepare = prepare
        self.observe = observe
        self.model_name = model_name
        self.retry = retry
        self.marker = marker
        self.retention_s = retention_s
        self._errors: tuple[type[BaseException], ...] = (OSError, ValueError, TypeError, *getattr(sink, "errors", ()))
        self._queue: queue.Queue[PendingRecord | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Condition()
        self._pending = 0
        self.committed = 0
        self.write_errors = 0
        self.dropped = 0
        self.pruned = 0
        self.last_commit_latency_ms = 0.0  # queueing -> commit of the oldest record of the last transaction
        self.max_commit_latency_ms = 0.0
        self._sink_open = False
        self._open_error: BaseException | None = None
        self._last_open_try = -math.inf
        self._last_error_log = -math.inf
        self._last_prune = -math.inf
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"cam-audit-writer-{model_name}", daemon=True)
        _WRITERS.add(self)
        _install_shutdown_hooks()
        self._try_open()  # at load: an unwritable directory or unreachable database is reported at once
        self._thread.start()

    def submit(self, record: PendingRecord) -> bool:
        with self._lock:
            if self._closed:
                self.dropped += 1
                record.committed = False
                return False
            self._pending += 1
        record.fields.setdefault("_queued", time.perf_counter())
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self._pending -= 1
                self.dropped += 1
                record.committed = False
                self._lock.notify_all()
            self._log_error(f"audit queue full ({self._queue.maxsize} records): dropping records")
            return False
        return True

    def wait(self, records: list[PendingRecord], timeout: float) -> list[bool]:
        """Wait until each of ``records`` is committed or lost (at most ``timeout`` s): committed or not, each."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while any(record.committed is None for record in records):
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    break
                self._lock.wait(min(left, 0.1))
            return [bool(record.committed) for record in records]

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
            self._lock.notify_all()
        self._queue.put(None)
        self._thread.join(timeout)
        self.sink.close()

    def count_write_errors(self, records: int) -> None:
        """Count ``records`` lost before they reached the queue (a failed :meth:`Auditor.record`)."""
        with self._lock:
            self.write_errors += records

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {"committed": self.committed, "write_errors": self.write_errors, "dropped": self.dropped}

    def _try_open(self) -> bool:
        if self._sink_open:
            return True
        now = time.monotonic()
        if now - self._last_open_try < REOPEN_INTERVAL_S:  # the last open failed: wait a little
            return False
        try:
            self.sink.open()
        except self._errors as error:
            self._last_open_try = now
            self._open_error = error
            self._unavailable(f"audit sink {self.sink!r} cannot be opened: {error}")
            self._log_error(f"audit sink {self.sink!r} cannot be opened: {error}; records are dropped and counted")
            return False
        self._sink_open = True
        return True

    def _unavailable(self, reason: str) -> None:
        if self.marker is not None:
            self.marker.set(reason)

    def _log_error(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            counts = self.counters()
            logger.error(
                "%s (model %s; so far %d records committed, %d lost to write errors, %d dropped)",
                message, self.model_name, counts["committed"], counts["write_errors"], counts["dropped"],
            )  # fmt: skip

    def _health_check(self) -> None:
        """While the marker is raised and nothing is queued: is the sink writable again?"""
        if not self._try_open():
            return
        try:
            check = getattr(self.sink, "check", None)
            if check is not None:
                check()
        except self._errors as error:
            self._sink_open = False
            self._unavailable(f"audit sink {self.sink!r} health check failed: {error}")
            return
        self.marker.clear()

    def _write(self, records: list[PendingRecord]) -> bool:
        """One attempt, or retries of transient errors (``retry``) for up to :data:`RETRY_WINDOW_S`."""
        started, delay = time.monotonic(), 0.25
        while True:
            error: BaseException | None = None
            if not self._try_open():
                error = self._open_error
            else:
                try:
                    self.sink.write(records)
                    return True
                except self._errors as caught:
                    error = self._open_error = caught
                    self._sink_open = False  # reopened by the next attempt (only failed opens wait)
                    self._unavailable(f"audit sink {self.sink!r} failed to write: {caught}")
                    self._log_error(f"audit sink {self.sink!r} failed to write {len(records)} record(s): {caught}")
            transient = error is not None and bool(getattr(self.sink, "transient", lambda e: False)(error))
            if not self.retry or not transient or self._closed or time.monotonic() - started > RETRY_WINDOW_S:
                return False
            time.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_DELAY_S)

    def _prune(self) -> None:
        now = time.monotonic()
        if self.retention_s is None or now - self._last_prune < PRUNE_INTERVAL_S or not hasattr(self.sink, "prune"):
            return
        self._last_prune = now
        try:
            removed = self.sink.prune(time.time() - self.retention_s)
        except self._errors as error:
            self._log_error(f"audit sink {self.sink!r} failed to prune: {error}")
            return
        self.pruned += removed
        if removed:
            logger.info("audit: pruned %d record(s) of %s older than %.0f days", removed, self.sink, self.retention_s / 86400)

    def _prepare(self, records: list[PendingRecord]) -> list[PendingRecord]:
        """The records ``prepare`` finished (the others lost and counted), shown once to ``observe``."""
        ready, failed = records, []
        if self.prepare is not None:
            ready = []
            for record in records:
                try:
                    self.prepare(record)
                    ready.append(record)
                except Exception as error:  # noqa: BLE001 - one record lost and counted, the writer goes on
                    failed.append(record)
                    self._log_error(f"audit record of {self.model_name} could not be finished: {error!r}")
        if failed:
            with self._lock:
                for record in failed:
                    record.committed = False
                self.write_errors += len(failed)
                self._pending -= len(failed)
                self._lock.notify_all()
        if self.observe is not None and ready:
            try:
                self.observe(ready)
            except Exception as error:  # noqa: BLE001 - metrics never cost a record
                self._log_error(f"audit metrics of {self.model_name} failed: {error!r}")
        return ready

    def _next_batch(self) -> list[PendingRecord | None]:
        """The next records to write (blocking; with a raised marker, health checks while idle)."""
        while True:
            waiting = self.marker is not None and self.marker.raised
            try:
                item = self._queue.get(timeout=HEALTH_INTERVAL_S if waiting else None)
                break
            except queue.Empty:
                self._health_check()
        batch = [item]
        while len(batch) < WRITE_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        stop = False
        while not stop:
            batch = self._next_batch()
            stop = any(entry is None for entry in batch)
            records = [entry for entry in batch if entry is not None]
            if not records:
                continue
            queued = [r.fields.pop("_queued", time.perf_counter()) for r in records]
            records = self._prepare(records)
            if not records:
                continue
            ok = self._write(records)
            if ok and self.marker is not None:
                self.marker.clear()
            with self._lock:
                for record in records:
                    record.committed = ok
                if ok:
                    self.committed += len(records)
                    self.last_commit_latency_ms = (time.perf_counter() - min(queued)) * 1000
                    self.max_commit_latency_ms = max(self.max_commit_latency_ms, self.last_commit_latency_ms)
                else:
                    self.write_errors += len(records)
                self._lock.notify_all()  # strict answers go now; a prune below holds only flush()
            if ok:
                self._prune()
            with self._lock:
                self._pending -= len(records)
                self._lock.notify_all()
