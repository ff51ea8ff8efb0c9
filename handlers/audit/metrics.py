"""The audit's TorchServe metrics (counters and gauges by model and sink)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["AuditMetrics"]


class AuditMetrics:
    """``AuditRecords`` (committed), ``AuditWriteErrors`` (records lost to sink errors), ``AuditDropped``
    (queue full), counters by model and sink; ``AuditFaithfulnessTime`` and ``AuditOverheadTime`` (ms per
    batch on the request path), gauges. Counters are published as deltas with each batch, from the
    request thread (the writer thread never touches TorchServe's metric cache).

    ``metrics``: ``(cache, MetricTypes)``, TorchServe's metric cache and its metric-type enum, as the
    handler found them on its context; None (outside TorchServe) makes every call a no-op."""

    NAMES = {"committed": "AuditRecords", "write_errors": "AuditWriteErrors", "dropped": "AuditDropped"}

    def __init__(self, metrics: tuple[Any, Any] | None, model_name: str, sink: str) -> None:
        self.dims = [model_name, sink]
        self.published = dict.fromkeys(self.NAMES, 0)
        self.counters: dict[str, Any] = {}
        self.gauges: dict[str, Any] = {}
        if metrics is None:
            return
        cache, MetricTypes = metrics
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
