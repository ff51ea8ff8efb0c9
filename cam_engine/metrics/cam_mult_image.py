"""Confidence change when the input is multiplied by the CAM (grad-cam 1.5.7 semantics)."""

from __future__ import annotations

import numpy as np
import torch

from .perturbation_confidence import PerturbationConfidenceMetric

__all__ = ["multiply_tensor_with_cam", "CamMultImageConfidenceChange", "DropInConfidence", "IncreaseInConfidence"]


def multiply_tensor_with_cam(input_tensor: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """``input * cam``: ``[C, H, W] * [H, W]`` (or batched ``[B, C, H, W] * [B, H, W]``)."""
    if input_tensor.ndim == cam.ndim + 1 and input_tensor.ndim == 4:
        return input_tensor * cam[:, None].to(input_tensor)
    return input_tensor * cam.to(input_tensor)


multiply_tensor_with_cam.batch = lambda inputs, cams: inputs * cams[:, None].to(inputs)  # type: ignore[attr-defined]


class CamMultImageConfidenceChange(PerturbationConfidenceMetric):
    """``target(model(x * cam)) - target(model(x))`` per image."""

    def __init__(self, batch_size: int = 64):
        super().__init__(multiply_tensor_with_cam, batch_size)


class DropInConfidence(CamMultImageConfidenceChange):
    """``max(target(model(x)) - target(model(x * cam)), 0)`` per image."""

    def __call__(self, *args, **kwargs) -> np.ndarray:
        return np.maximum(-super().__call__(*args, **kwargs), 0)


class IncreaseInConfidence(CamMultImageConfidenceChange):
    """1 where ``target(model(x * cam)) > target(model(x))``, else 0, per image (float32)."""

    def __call__(self, *args, **kwargs) -> np.ndarray:
        return np.float32(super().__call__(*args, **kwargs) > 0)
