"""ARCC (arXiv:2605.14641): the harmonic mean of Complexity, Coherency and ROAD, grad-cam 1.5.7 semantics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .road import ROADCombined

__all__ = ["ARCC", "Coherency", "Complexity", "batch_pearson_coherency"]


def batch_pearson_coherency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of maps ``a[i]``, ``b[i]`` (``[B, ...]``): ``[B]``, eps 1e-8."""
    a = np.asarray(a).reshape(len(a), -1)
    b = np.asarray(b).reshape(len(b), -1)
    a_centred = a - a.mean(axis=1, keepdims=True)
    b_centred = b - b.mean(axis=1, keepdims=True)
    n = a.shape[1] - 1
    cov = (a_centred * b_centred).sum(axis=1) / n
    std_a = np.sqrt((a_centred**2).sum(axis=1) / n)
    std_b = np.sqrt((b_centred**2).sum(axis=1) / n)
    return cov / (std_a * std_b + 1e-8)


class Complexity:
    """Mean absolute value of each CAM ``[B, H, W]`` -> ``[B]`` in [0, 1] for CAMs in [0, 1]."""

    def __call__(self, grayscale_cams: np.ndarray) -> np.ndarray:
        flat = np.asarray(grayscale_cams).reshape(len(grayscale_cams), -1)
        return np.abs(flat).sum(axis=1) / flat.shape[1]


class Coherency:
    """``(r + 1) / 2`` where ``r`` is the Pearson correlation of a CAM with the CAM of ``input * cam``."""

    def __call__(self, input_tensor: torch.Tensor, grayscale_cams: np.ndarray, targets: Sequence[Callable],
                 model: nn.Module, base_method: Any) -> np.ndarray:
        cams = torch.from_numpy(np.float32(grayscale_cams)).unsqueeze(1).to(input_tensor.device)
        mixed_cams = base_method(input_tensor=input_tensor * cams, targets=targets)
        return (batch_pearson_coherency(mixed_cams, grayscale_cams) + 1) / 2


class ARCC:
    """``3 / (1/coherency + 1/(1 - complexity) + 1/road)``, ROAD (combined, at ``road_percentiles``)
    mapped to [0, 1] by ``clip(2 * road, 0, 1)``; eps 1e-8 in each term. ``[B]``."""

    def __init__(self, base_method: Any, road_percentiles: Sequence[float] = (20, 40, 60, 80)) -> None:
        self.complexity = Complexity()
        self.coherency = Coherency()
        self.road = ROADCombined(percentiles=list(road_percentiles))
        self.base_method = base_method

    def __call__(self, input_tensor: torch.Tensor, grayscale_cams: np.ndarray, targets: Sequence[Callable],
                 model: nn.Module) -> np.ndarray:
        complexity = self.complexity(grayscale_cams)
        coherency = self.coherency(input_tensor, grayscale_cams, targets, model, self.base_method)
        road = (self.road(input_tensor, grayscale_cams, targets, model) * 2).clip(0, 1)
        return 3 * ((1 / (coherency + 1e-8)) + (1 / ((1 - complexity) + 1e-8)) + (1 / (road + 1e-8))) ** (-1)
