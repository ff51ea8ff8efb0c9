"""Sanity baselines: CAMs that ignore what the model computed."""

from __future__ import annotations

import numpy as np
import torch

from . import functional as CF
from .core import BaseCAM
from .registry import register

__all__ = ["RandomCAM"]


@register("randomcam")
class RandomCAM(BaseCAM):
    """Random channel weights: ``cam = relu(sum_c w_c A_c)``, ``w ~ U(-1, 1)`` of shape ``[B, C]``.

    A baseline that a faithful method must beat (e.g. on ROAD). Gradient-free. The weights are drawn
    from NumPy's global generator, as grad-cam 1.5.7 does, so ``np.random.seed`` reproduces the
    reference's maps; pass ``seed`` for a private, reproducible generator instead.
    """

    uses_gradients = False

    def __init__(self, model, target_layers, reshape_transform=None, seed: int | None = None):
        super().__init__(model, target_layers, reshape_transform)
        self._rng = None if seed is None else np.random.default_rng(seed)

    def cam_image(self, activations: torch.Tensor, gradients: torch.Tensor | None, eigen_smooth: bool) -> torch.Tensor:
        shape = tuple(activations.shape[:2])
        draw = np.random.uniform(-1, 1, size=shape) if self._rng is None else self._rng.uniform(-1, 1, size=shape)
        weights = torch.from_numpy(draw).to(device=activations.device, dtype=torch.float32)
        return CF.weighted_sum(weights, activations, eigen_smooth)
