"""The audit's TorchServe metrics: counters by model and sink, and time histograms.

Counters (ModelName, Sink): ``AuditRecords`` (committed), ``AuditWriteErrors`` (records lost to sink
errors, or that the writer could not finish), ``AuditDropped`` (queue full). They are published as deltas
with each batch, from the request thread (the writer thread keeps the running totals); the first batch
publishes all three, zeros included, so that every series exists from the start (``rate()`` and a
dashboard's "drops" panel need it).

Histograms (ModelName, Sink), **seconds** per audited batch on the request path, TorchServe's fixed
buckets 5 ms .. 10 s (see :mod:`handlers.serving.metrics` for why those buckets and that unit):
``AuditOverheadSeconds`` (the whole :meth:`~handlers.audit.Auditor.record` call: the fields, the
faithfulness check, the host copy, queueing and, with ``strict``, the wait for the commit) and
``AuditFaithfulnessSeconds`` (the faithfulness check
alone: one forward pass for ``remove_top``, ROAD's imputations and passes for ``road``).

Drift signals (:meth:`AuditMetrics.drift`, per audited record, called by the writer thread once for each
record it finishes, committed or not; that thread alone touches their state, and TorchServe's metric
objects only log a line per observation):

- ``AuditFaithfulness`` (ModelName), histogram of each record's faithfulness (the confidence drop,
  -1..1; with the fixed buckets 0.005 .. 1 a negative drop counts in the lowest bucket, which is what a
  "median fell below X" alert needs for X > 0.005);
- ``AuditTop10Mass`` (ModelName), histogram of each record's top-10% mass (0.1 .. 1);
- ``AuditTopClass`` (ModelName, Class), counter of audited top-1 classes: a class gets its own label once
  it is among the worker's ``drift.top_classes`` most frequent so far, at most ``2 x top_classes``
  labels in all; the rest count as ``other`` (bounded cardinality, whatever the traffic);
- ``AuditDriftFaithfulnessFloor`` and ``AuditDriftShareShift`` (ModelName), gauges holding the
  config's alert thresholds (``drift.faithfulness_floor``, ``drift.class_share_shift``), set on the
  first batch: the shipped alert rules compare with them, so thresholds live in each model's config.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["AuditMetrics", "ClassLabels", "OVERHEAD_SECONDS", "FAITHFULNESS_SECONDS", "DRIFT_METRICS", "OTHER_CLASS"]

OVERHEAD_SECONDS = "AuditOverheadSeconds"
FAITHFULNESS_SECONDS = "AuditFaithfulnessSeconds"
#: drift metric names: histograms, the class counter, the threshold gauges
DRIFT_METRICS = {
    "faithfulness": "AuditFaithfulness", "top10_mass": "AuditTop10Mass", "top_class": "AuditTopClass",
    "floor": "AuditDriftFaithfulnessFloor", "shift": "AuditDriftShareShift",
}  # fmt: skip
OTHER_CLASS = "other"


class ClassLabels:
    """The ``Class`` label of an audited top-1 class, with bounded cardinality.

    A class is named once it is among the ``top`` most frequent classes seen so far (running counts);
    a class once named keeps its label; at most ``2 * top`` classes are ever named, the rest are
    :data:`OTHER_CLASS`."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.counts: Counter[str] = Counter()
        self.named: set[str] = set()

    def label(self, name: str) -> str:
        self.counts[name] += 1
        if name in self.named:
            return name
        if len(self.named) < 2 * self.top:
            leaders = {n for n, _ in self.counts.most_common(self.top)}
            if name in leaders:
                self.named.add(name)
                return name
        return OTHER_CLASS


class AuditMetrics:
    """The audit's metrics (see the module docstring) for one model and sink.

    ``metrics``: ``(cache, MetricTypes)``, TorchServe's metric cache and its metric-type enum, as the
    handler found them on its context; None (outside TorchServe) makes every call a no-op."""

    NAMES = {"committed": "AuditRecords", "write_errors": "AuditWriteErrors", "dropped": "AuditDropped"}

    def __init__(self, metrics: tuple[Any, Any] | None, model_name: str, sink: str, drift: Any = None) -> None:
        self.dims = [model_name, sink]
        self.model_name = model_name
        self.published: dict[str, int | None] = dict.fromkeys(self.NAMES)  # None: never published
        self.counters: dict[str, Any] = {}
        self.histograms: dict[str, Any] = {}
        self.drift_metrics: dict[str, Any] = {}
        self.drift_config = drift
        self.classes = ClassLabels(drift.top_classes if drift is not None else 10)
        self._thresholds_published = False
        if metrics is None:
            return
        cache, MetricTypes = metrics
        dims = ["ModelName", "Sink"]
        for key, name in self.NAMES.items():
            self.counters[key] = cache.add_metric_to_cache(name, "count", dims, MetricTypes.COUNTER)
        for name in (OVERHEAD_SECONDS, FAITHFULNESS_SECONDS):
            self.histograms[name] = cache.add_metric_to_cache(name, "s", dims, MetricTypes.HISTOGRAM)
        by_model = ["ModelName"]
        for key in ("faithfulness", "top10_mass"):
            self.drift_metrics[key] = cache.add_metric_to_cache(DRIFT_METRICS[key], "ratio", by_model, MetricTypes.HISTOGRAM)
        self.drift_metrics["top_class"] = cache.add_metric_to_cache(
            DRIFT_METRICS["top_class"], "count", ["ModelName", "Class"], MetricTypes.COUNTER
        )
        for key in ("floor", "shift"):
            self.drift_metrics[key] = cache.add_metric_to_cache(DRIFT_METRICS[key], "ratio", by_model, MetricTypes.GAUGE)

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

    def drift(self, records: Sequence[Mapping[str, Any]]) -> None:
        """The drift signals of a batch's audited records (their ``fields``): see the module docstring."""
        if not self.drift_metrics:
            return
        model = [self.model_name]
        if not self._thresholds_published and self.drift_config is not None:
            self.drift_metrics["floor"].add_or_update(self.drift_config.faithfulness_floor, model)
            self.drift_metrics["shift"].add_or_update(self.drift_config.class_share_shift, model)
            self._thresholds_published = True
        classes: Counter[str] = Counter()
        for fields in records:
            for key in ("faithfulness", "top10_mass"):
                if isinstance(fields.get(key), (int, float)):
                    self.drift_metrics[key].add_or_update(round(float(fields[key]), 6), model)
            name = fields.get("top_label") or fields.get("top_index")
            if name is not None:
                classes[self.classes.label(str(name))] += 1
        for label, count in classes.items():
            self.drift_metrics["top_class"].add_or_update(count, [self.model_name, label])
