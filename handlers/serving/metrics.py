"""TorchServe custom metrics of the handlers (the audit's own are in :mod:`handlers.audit.metrics`).

Times are Prometheus **histograms**, through TorchServe's own metrics API: a backend metric of type
``MetricTypes.HISTOGRAM`` (with ``model_metrics_auto_detect=true`` and ``metrics_mode=prometheus``, as
``config.properties`` and the deploy configs set) is registered by TorchServe 0.12's frontend as an
``io.prometheus.client.Histogram`` and served on the metrics port's ``/metrics`` as real histogram
series: ``<Name>_bucket{le="..."}``, ``<Name>_sum`` and ``<Name>_count``, labelled with the dimensions
below plus ``Hostname``. Each observation is one log line of the worker (as for counters and gauges).

The buckets are not ours to choose: TorchServe builds the histogram with the Prometheus Java client's
default buckets, ``0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10`` (and
``+Inf``), and its metrics configuration has no bucket field. So each metric is observed in the unit
that puts those fixed edges where its values fall:

- ``CamMethodSeconds`` (ModelName, Method), **seconds** per batched CAM call (forward + the method's
  passes, every image and target of the batch): edges 5 ms .. 10 s, from a last-layer CAM on a GPU
  (a few ms) to ScoreCAM on a CPU (seconds);
- ``HeatmapEncodeMilliseconds`` (ModelName, Format), **milliseconds** per encoded picture (PNG heatmap
  or JPEG overlay): edges 5 us .. 10 ms, where encodes fall (measured here: 224x224 PNG 0.6 ms,
  640x480 PNG 3 ms, JPEG overlays 0.2-0.7 ms); a full-HD PNG (~20 ms) lands in ``+Inf``.

Prometheus' ``histogram_quantile`` interpolates inside a bucket; a quantile in ``+Inf`` reads as the
largest finite edge. A worker-side ``prometheus_client`` with buckets of our own was the alternative and
was rejected: several workers per model, each a process, would need its multiprocess mode and a port
of its own per worker beside TorchServe's metrics port, which is what users already scrape.

Counters: ``CamExplanations`` (ModelName, Method; explained (image, target) pairs) and ``HeatmapBytes``
(ModelName, Format; encoded bytes): ``rate(HeatmapBytes[5m]) / rate(HeatmapEncodeMilliseconds_count[5m])``
is the mean picture size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["metrics_cache", "CamMetrics", "CAM_SECONDS", "ENCODE_MILLISECONDS"]

CAM_SECONDS = "CamMethodSeconds"
ENCODE_MILLISECONDS = "HeatmapEncodeMilliseconds"


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
    """The handler's custom metrics (see the module docstring); every call is a no-op without TorchServe."""

    def __init__(self, context: Any, model_name: str) -> None:
        self.model_name = model_name
        self._cam_seconds = self._explanations = self._encode_ms = self._heatmap_bytes = None
        found = metrics_cache(context)
        if found is None:
            return
        cache, MetricTypes = found
        by_method, by_format = ["ModelName", "Method"], ["ModelName", "Format"]
        self._cam_seconds = cache.add_metric_to_cache(CAM_SECONDS, "s", by_method, MetricTypes.HISTOGRAM)
        self._explanations = cache.add_metric_to_cache("CamExplanations", "count", by_method, MetricTypes.COUNTER)
        self._encode_ms = cache.add_metric_to_cache(ENCODE_MILLISECONDS, "ms", by_format, MetricTypes.HISTOGRAM)
        self._heatmap_bytes = cache.add_metric_to_cache("HeatmapBytes", "bytes", by_format, MetricTypes.COUNTER)

    def cam(self, method: str, milliseconds: float, explanations: int) -> None:
        """One batched CAM call of ``method`` that took ``milliseconds`` for ``explanations`` pairs."""
        if self._cam_seconds is not None:
            self._cam_seconds.add_or_update(round(milliseconds / 1000, 6), [self.model_name, method])
            self._explanations.add_or_update(explanations, [self.model_name, method])

    def encoded(self, fmt: str, encoder: Callable[..., Any], *arguments: Any) -> Any:
        """``encoder(*arguments)``, the picture encoded as ``fmt`` (bytes, or ``(bytes, fields)``), with its
        time and size recorded."""
        started = time.perf_counter()
        result = encoder(*arguments)
        data = result[0] if isinstance(result, tuple) else result  # encode_raw: (bytes, its dtype/shape fields)
        if self._encode_ms is not None:
            self._encode_ms.add_or_update(round((time.perf_counter() - started) * 1000, 4), [self.model_name, fmt])
            self._heatmap_bytes.add_or_update(len(data), [self.model_name, fmt])
        return result
