"""The audit's writer thread: records queued on the request path are committed to a sink in batches.

Nothing on the request path waits for the disk (unless ``durability: strict`` flushes). At interpreter
exit and on SIGTERM every writer's queue is drained for at most :data:`SHUTDOWN_FLUSH_S` seconds.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import queue
import signal
import sqlite3
import threading
import time
import weakref
from typing import Any

from .sinks import PendingRecord

__all__ = ["AuditWriter", "SHUTDOWN_FLUSH_S"]

logger = logging.getLogger(__name__)

SHUTDOWN_FLUSH_S = 10.0
ERROR_LOG_INTERVAL_S = 30.0
REOPEN_INTERVAL_S = 5.0
WRITE_BATCH = 256

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
