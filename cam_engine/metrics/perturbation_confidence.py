"""Perturb the input according to a CAM and measure the change in the target score.

``metric(input_tensor [B, C, H, W], cams [B, H, W], targets (one per image), model)`` returns
float32 NumPy ``[B]``: ``target(model(perturbed)) - target(model(input))`` per image (or the score
after perturbation alone with ``return_diff=False``). The model runs under ``inference_mode`` in eval
mode (restored afterwards), batched: ``batch_size`` perturbed images per forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model_utils import eval_mode, model_scores

__all__ = [
    "PerturbationConfidenceMetric",
    "RemoveMostRelevantFirst",
    "RemoveLeastRelevantFirst",
    "AveragerAcrossThresholds",
    "target_scores",
]


def _as_tensor(cams: Any) -> torch.Tensor:
    return cams.detach().cpu().float() if isinstance(cams, torch.Tensor) else torch.from_numpy(np.asarray(cams, dtype=np.float32))


def target_scores(model: nn.Module, batch: torch.Tensor, targets: Sequence[Callable], batch_size: int = 64) -> np.ndarray:
    """``target_i(model(batch)[i])`` for every row, float32 ``[R]``; ``targets`` has one entry per row."""
    values = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, batch.shape[0], batch_size):
            scores = model_scores(model(batch[start : start + batch_size]))
            for offset in range(scores.shape[0] if isinstance(scores, torch.Tensor) else len(scores)):
                values.append(float(torch.as_tensor(targets[start + offset](scores[offset])).float().sum()))
    return np.float32(values)


class PerturbationConfidenceMetric:
    """Score change after ``perturbation(image [C, H, W], cam [H, W]) -> image`` is applied per image.

    A perturbation may also offer ``batch(input_tensor [B, C, H, W], cams [B, H, W]) -> [B, C, H, W]``,
    used when present (vectorised over the batch, same result).
    """

    def __init__(self, perturbation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int = 64):
        self.perturbation = perturbation
        self.batch_size = batch_size

    def perturb(self, input_tensor: torch.Tensor, cams: Any) -> torch.Tensor:
        """The perturbed batch ``[B, C, H, W]`` on the input's device."""
        cam_tensor = _as_tensor(cams)
        batched = getattr(self.perturbation, "batch", None)
        if batched is not None:
            return batched(input_tensor, cam_tensor).to(input_tensor.device)
        return torch.stack(
            [self.perturbation(input_tensor[i].cpu(), cam_tensor[i]).to(input_tensor.device) for i in range(input_tensor.shape[0])]
        )

    def __call__(
        self,
        input_tensor: torch.Tensor,
        cams: Any,
        targets: Sequence[Callable],
        model: nn.Module,
        return_visualization: bool = False,
        return_diff: bool = True,
    ):
        perturbed = self.perturb(input_tensor, cams)
        after = target_scores(model, perturbed, targets, self.batch_size)
        result = after - target_scores(model, input_tensor, targets, self.batch_size) if return_diff else after
        return (result, perturbed) if return_visualization else result


def _otsu_threshold(values: np.ndarray) -> int:
    """OpenCV's Otsu threshold of uint8 ``values`` (a literal port of ``getThreshVal_Otsu_8u``)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64) / values.size
    mu = float((hist * np.arange(256)).sum())
    q1 = mu1 = max_sigma = 0.0
    max_val = 0
    eps = float(np.finfo(np.float32).eps)
    for i in range(256):
        p_i = float(hist[i])
        mu1 *= q1
        q1 += p_i
        q2 = 1.0 - q1
        if min(q1, q2) < eps or max(q1, q2) > 1.0 - eps:
            continue
        mu1 = (mu1 + i * p_i) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) ** 2
        if sigma > max_sigma:
            max_sigma, max_val = sigma, i
    return max_val


class RemoveMostRelevantFirst:
    """Keep the pixels whose CAM value is below the ``percentile``-th percentile; impute the rest.

    ``binary_mask = cam < percentile(cam, p)`` (NumPy's linear percentile, float32): 1 = kept,
    0 = imputed. ``percentile="auto"`` keeps the pixels above Otsu's threshold of ``uint8(cam * 255)``
    (as grad-cam does). The imputer is called as ``imputer(image [C, H, W], binary_mask [H, W])``.
    """

    def __init__(self, percentile: float | str, imputer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.percentile = percentile
        self.imputer = imputer

    def binary_mask(self, mask: torch.Tensor) -> torch.Tensor:
        values = mask.detach().cpu().float().numpy()
        if self.percentile != "auto":
            threshold = np.percentile(values, self.percentile)
            return torch.from_numpy(np.float32(values < threshold))
        as_uint8 = np.uint8(values * 255)
        return torch.from_numpy(np.float32(as_uint8 > _otsu_threshold(as_uint8)))

    def __call__(self, input_tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.imputer(input_tensor, self.binary_mask(mask).to(mask.device))


class RemoveLeastRelevantFirst(RemoveMostRelevantFirst):
    """[`RemoveMostRelevantFirst`][cam_engine.metrics.perturbation_confidence.RemoveMostRelevantFirst] on ``1 - cam``: the least relevant pixels are imputed."""

    def __call__(self, input_tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return super().__call__(input_tensor, 1 - mask)


class AveragerAcrossThresholds:
    """Mean over ``percentiles`` of ``metric_class(percentile)``; the clean scores are computed once."""

    def __init__(self, imputer: Callable[[float], PerturbationConfidenceMetric],
                 percentiles: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90)):
        self.imputer = imputer
        self.percentiles = list(percentiles)

    def __call__(self, input_tensor: torch.Tensor, cams: Any, targets: Sequence[Callable], model: nn.Module) -> np.ndarray:
        metrics = [self.imputer(p) for p in self.percentiles]
        batch_size = min(m.batch_size for m in metrics)
        before = target_scores(model, input_tensor, targets, batch_size)
        # Perturb percentile by percentile, image by image: the imputers' noise is drawn in the
        # reference's order, so a fixed seed gives the reference's numbers.
        perturbed = torch.cat([m.perturb(input_tensor, cams) for m in metrics])
        after = target_scores(model, perturbed, list(targets) * len(metrics), batch_size)
        scores = after.reshape(len(metrics), -1) - before[None]
        return np.mean(np.float32(scores), axis=0)
