"""Heatmap maths of the audit: a heatmap's summary, a record's summaries (:func:`summarise`, on the
writer thread) and the faithfulness check's perturbation.

Shapes: a heatmap ``[h, w]`` with values >= 0; model inputs ``[N, C, H, W]`` (normalised) and their
CAMs ``[N, H, W]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from cam_engine.image import to_uint8
from handlers.serving.preprocess import to_source

from .sinks import PendingRecord

__all__ = [
    "heatmap_summary", "summarise", "remove_top_pixels", "confidence", "REMOVED_FRACTION", "TOP_MASS_FRACTION",
    "SUMMARY_FIELDS",
]  # fmt: skip

REMOVED_FRACTION = 0.2  # faithfulness: the share of heatmap pixels removed from the input
TOP_MASS_FRACTION = 0.1  # summary: the share of pixels whose mass is reported
#: the summary of a record's first heatmap, copied to the record's own columns
SUMMARY_FIELDS = ("peak_x", "peak_y", "top10_mass", "entropy")


def heatmap_summary(heatmap: torch.Tensor) -> dict[str, Any]:
    """Peak, top-10% mass share and normalised entropy of one heatmap ``[h, w]`` (values >= 0).

    ``peak_x``/``peak_y``: column/row of the maximum (the first one in row-major order);
    ``top10_mass``: ``sum of the ceil(0.1 n) largest values / sum of all``; ``entropy``:
    ``-sum(p log p) / log(n)`` with ``p = heatmap / sum(heatmap)``. Both are None for an all-zero map.
    """
    flat = heatmap.detach().float().reshape(-1).clamp_min(0).cpu().numpy()
    count = flat.size
    peak = int(flat.argmax())
    width = heatmap.shape[-1]
    total = float(flat.sum(dtype=np.float64))
    summary: dict[str, Any] = {"peak_x": peak % width, "peak_y": peak // width, "top10_mass": None, "entropy": None}
    if total <= 0 or count < 2:
        return summary
    top = max(1, math.ceil(TOP_MASS_FRACTION * count))
    # a partial sort (numpy's introselect) rather than topk: on a 224x224 map it is a third of topk's time
    largest = np.partition(flat, count - top)[count - top :]
    summary["top10_mass"] = round(float(largest.sum(dtype=np.float64)) / total, 6)
    p = flat[flat > 0] / total  # 0 log 0 = 0
    summary["entropy"] = round(float(-(p * np.log(p)).sum(dtype=np.float64)) / math.log(count), 6)
    return summary


def summarise(record: PendingRecord, store_heatmaps: bool) -> None:
    """The writer's summary work for one record: its model-input CAMs (``record.cams``, ``[T, H, W]``, one
    per entry of ``fields["explanations"]``) mapped onto the submitted image, each explanation given its
    :func:`heatmap_summary`, the record its first one's (:data:`SUMMARY_FIELDS`) and, with
    ``store_heatmaps``, the 8-bit heatmaps encoded as PNGs. Drops the CAMs; a record without them is left
    as it is."""
    cams, record.cams = record.cams, None
    if cams is None:
        return
    explanations = record.fields["explanations"]
    mapped = to_source(cams[: len(explanations)], record.geometry)  # [T, h, w] in [0, 1]
    for explanation, heatmap in zip(explanations, mapped):
        explanation.update(heatmap_summary(heatmap))
    if explanations:
        record.fields.update({key: explanations[0][key] for key in SUMMARY_FIELDS})
    if store_heatmaps and explanations:
        record.heatmaps = to_uint8(mapped).numpy()
        record.heatmap_pngs()  # encoded now: a write batch holds PNGs, not full-size arrays


def remove_top_pixels(inputs: torch.Tensor, cams: torch.Tensor, fraction: float = REMOVED_FRACTION) -> torch.Tensor:
    """Inputs ``[N, C, H, W]`` with the ``round(fraction * H * W)`` hottest pixels of ``cams`` ``[N, H, W]``
    set to 0 in every channel (after normalisation: the dataset's mean colour). Returns a new tensor."""
    count, height, width = cams.shape
    removed = max(1, round(fraction * height * width))
    hottest = cams.reshape(count, -1).float().topk(removed, dim=1).indices
    keep = torch.ones((count, height * width), dtype=inputs.dtype, device=inputs.device)
    keep.scatter_(1, hottest.to(inputs.device), 0)
    return inputs * keep.reshape(count, 1, height, width)


def confidence(scores: Any, row: int, target: Any) -> tuple[float, str]:
    """The target's confidence in image ``row``: softmax probability for [B, C] class scores, else the raw score."""
    if isinstance(scores, torch.Tensor) and scores.ndim == 2:
        return float(target(torch.softmax(scores[row].float(), dim=-1))), "softmax"
    return float(target(scores[row])), "score"
