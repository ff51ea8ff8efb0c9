"""TorchServe custom metrics of the handlers (the audit's own are in :mod:`handlers.audit.metrics`)."""

from __future__ import annotations

from typing import Any

__all__ = ["metrics_cache", "CamMetrics"]


def metrics_cache(context: Any) -> tuple[Any, Any] | None:
    """TorchServe's metric cache of ``context`` and its ``MetricTypes`` enum; None outside TorchServe."""
    cache = getattr(context, "metrics", None)
    if cache is None or not hasattr(cache, "add_metric_to_cache"):
        return None
    try:
        from ts.metrics.metric_type_enum import MetricTypes
    except ImportError:  # pragma: no cover - TorchServe absent
        return None
    return cache, MetricTypes


class CamMetrics:
    """Custom metrics: ``CamMethodTime`` (ms per batched CAM call, by method), ``CamExplanations``
    (count, by method) and ``HeatmapBytes`` (encoded bytes per response). A no-op without TorchServe."""

    def __init__(self, context: Any, model_name: str) -> None:
        self.model_name = model_name
        self._cam_time = self._explanations = self._heatmap_bytes = None
        found = metrics_cache(context)
        if found is None:
            return
        cache, MetricTypes = found
        dims = ["ModelName", "Method"]
        self._cam_time = cache.add_metric_to_cache("CamMethodTime", "ms", dims, MetricTypes.GAUGE)
        self._explanations = cache.add_metric_to_cache("CamExplanations", "count", dims, MetricTypes.COUNTER)
        self._heatmap_bytes = cache.add_metric_to_cache(
            "HeatmapBytes", "bytes", ["ModelName", "Format"], MetricTypes.GAUGE
        )

    def cam(self, method: str, milliseconds: float, explanations: int) -> None:
        if self._cam_time is not None:
            self._cam_time.add_or_update(round(milliseconds, 3), [self.model_name, method])
            self._explanations.add_or_update(explanations, [self.model_name, method])

    def heatmap(self, fmt: str, size: int) -> None:
        if self._heatmap_bytes is not None:
            self._heatmap_bytes.add_or_update(size, [self.model_name, fmt])
