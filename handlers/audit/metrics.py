"""The audit's TorchServe metrics: counters by model and sink, and time histograms.

Counters (ModelName, Sink): ``AuditRecords`` (committed), ``AuditWriteErrors`` (records lost to sink
errors), ``AuditDropped`` (queue full). They are published as deltas with each batch, from the request
thread (the writer thread never touches TorchServe's metric cache); the first batch publishes all three,
zeros included, so that every series exists from the start (``rate()`` and a dashboard's "drops" panel
need it).

Histograms (ModelName, Sink), **seconds** per audited batch on the request path, TorchServe's fixed
buckets 5 ms .. 10 s (see :mod:`handlers.serving.metrics` for why those buckets and that unit):
``AuditOverheadSeconds`` (the whole :meth:`~handlers.audit.Auditor.record` call: summaries, the
faithfulness check, the host copy, queueing) and ``AuditFaithfulnessSeconds`` (the faithfulness check
alone: one forward pass for ``remove_top``, ROAD's imputations and passes for ``road``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["AuditMetrics", "OVERHEAD_SECONDS", "FAITHFULNESS_SECONDS"]

OVERHEAD_SECONDS = "AuditOverheadSeconds"
FAITHFULNESS_SECONDS = "AuditFaithfulnessSeconds"


class AuditMetrics:
    """The audit's metrics (see the module docstring) for one model and sink.

    ``metrics``: ``(cache, MetricTypes)``, TorchServe's metric cache and its metric-type enum, as the
    handler found them on its context; None (outside TorchServe) makes every call a no-op."""

    NAMES = {"committed": "AuditRecords", "write_errors": "AuditWriteErrors", "dropped": "AuditDropped"}

    def __init__(self, metrics: tuple[Any, Any] | None, model_name: str, sink: str) -> None:
        self.dims = [model_name, sink]
        self.published: dict[str, int | None] = dict.fromkeys(self.NAMES)  # None: never published
        self.counters: dict[str, Any] = {}
        self.histograms: dict[str, Any] = {}
        if metrics is None:
            return
        cache, MetricTypes = metrics
        dims = ["ModelName", "Sink"]
        for key, name in self.NAMES.items():
            self.counters[key] = cache.add_metric_to_cache(name, "count", dims, MetricTypes.COUNTER)
        for name in (OVERHEAD_SECONDS, FAITHFULNESS_SECONDS):
            self.histograms[name] = cache.add_metric_to_cache(name, "s", dims, MetricTypes.HISTOGRAM)

    def publish(self, counts: Mapping[str, int]) -> None:
        """Add to each counter what ``counts`` (running totals) gained since the last call."""
        for key, metric in self.counters.items():
            before = self.published[key]
            delta = counts[key] - (before or 0)
            if delta > 0 or before is None:
                metric.add_or_update(max(delta, 0), self.dims)
                self.published[key] = counts[key]

    def observe(self, name: str, milliseconds: float) -> None:
        """One observation of histogram ``name`` (:data:`OVERHEAD_SECONDS`, :data:`FAITHFULNESS_SECONDS`)."""
        if name in self.histograms:
            self.histograms[name].add_or_update(round(milliseconds / 1000, 6), self.dims)
