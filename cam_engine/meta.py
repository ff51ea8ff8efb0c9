"""Meta-methods that combine the CAMs of a base method: RefineCAM (across layers) and SESS (across
scales and windows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import resize

from . import functional as CF
from .core import BaseCAM, CAMResult
from .methods import GradCAM, GradCAMPlusPlus
from .model_utils import eval_mode, model_scores
from .targets import ClassifierOutputTarget

__all__ = ["RefineCAM", "SESS", "sliding_window", "window_starts", "gaussian_blur"]


def refine_product(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """RefineCAM's aggregation: ``scale(prod_l scale(relu(cam_l)))`` over layers, ``[N, *S]``."""
    product = torch.ones_like(per_layer[0])
    for cam in per_layer:
        product = product * CF.scale_per_image(cam.clamp_min(0))
    return CF.scale_per_image(product)


class RefineCAM:
    """RefineCAM (arXiv:2605.14641): the product over target layers of ``base_method``'s per-layer
    CAMs, min-max scaled; denoises early-layer maps.

    The layers share one forward (and backward) pass: ``base_method`` is built once for all
    ``target_layers`` with its layer aggregation ([`BaseCAM.aggregate_layers`][cam_engine.BaseCAM.aggregate_layers]) replaced by the
    product. A base method on grad-cam's extension path runs once per layer, as the reference does.
    ``kwargs`` go to ``base_method``.
    """

    def __init__(self, model: nn.Module, target_layers: Sequence[Any], reshape_transform: Callable | None = None,
                 base_method: type[BaseCAM] = GradCAMPlusPlus, **kwargs: Any) -> None:
        self.model = model
        self.base_cam = base_method(model, target_layers, reshape_transform, **kwargs)
        self.target_layers = self.base_cam.target_layers
        self.device = self.base_cam.device
        self.per_layer = None
        if self.base_cam.uses_extension_path():
            self.per_layer = [base_method(model, [layer], reshape_transform, **kwargs) for layer in self.target_layers]
        else:
            self.base_cam.aggregate_layers = refine_product

    def run(self, input_tensor: torch.Tensor, targets: Sequence[Sequence[Any]] | None = None,
            aug_smooth: bool = False, eigen_smooth: bool = False) -> CAMResult:
        """As [`BaseCAM.run`][cam_engine.BaseCAM.run] (fast-path base methods only)."""
        if self.per_layer is not None:
            raise TypeError("RefineCAM.run needs a base method on the engine's fast path")
        return self.base_cam.run(input_tensor, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)

    def explain(self, input_tensor: torch.Tensor, targets: Sequence[Any] | None = None,
                aug_smooth: bool = False, eigen_smooth: bool = False) -> torch.Tensor:
        """CAMs ``[B, H, W]`` in [0, 1] on the model's device."""
        if self.per_layer is not None:
            return torch.from_numpy(self.forward(input_tensor, targets, eigen_smooth)).to(self.device)
        return self.base_cam.explain(input_tensor, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)

    def forward(self, input_tensor: torch.Tensor, targets: Sequence[Any] | None = None,
                eigen_smooth: bool = False) -> np.ndarray:
        """grad-cam's call: NumPy ``[B, H, W]``."""
        if self.per_layer is None:
            return self.base_cam(input_tensor, targets, eigen_smooth=eigen_smooth)
        cams = [torch.from_numpy(np.float32(cam(input_tensor, targets, eigen_smooth=eigen_smooth)))
                for cam in self.per_layer]
        return refine_product(cams).numpy()

    __call__ = forward

    def __enter__(self) -> RefineCAM:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.base_cam.__exit__(*exc_info)


def window_starts(length: int, step_size: int, window_size: int) -> list[int]:
    """Window starts along one axis; the last window is shifted back inside the image."""
    starts = []
    for start in range(0, length, step_size):
        if start + window_size >= length:
            starts.append(max(length - window_size, 0))
            break
        starts.append(start)
    return starts


def sliding_window(height: int, width: int, step_size: int, window_size: int) -> list[tuple[int, int]]:
    """Top-left corners ``(x, y)`` of the windows covering a ``height x width`` image, row-major."""
    return [(x, y) for y in window_starts(height, step_size, window_size) for x in window_starts(width, step_size, window_size)]


def gaussian_blur(image: torch.Tensor, ksize: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """OpenCV's ``GaussianBlur(image, (ksize, ksize), sigma)`` of ``[H, W]`` (border: reflect-101)."""
    coords = torch.arange(ksize, dtype=torch.float64, device=image.device) - (ksize - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(image.dtype)
    pad = ksize // 2
    x = image[None, None]
    x = F.pad(x, (pad, pad, 0, 0), mode="reflect") if image.shape[1] > pad else F.pad(x, (pad, pad, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.reshape(1, 1, 1, -1))
    x = F.pad(x, (0, 0, pad, pad), mode="reflect") if image.shape[0] > pad else F.pad(x, (0, 0, pad, pad), mode="replicate")
    x = F.conv2d(x, kernel.reshape(1, 1, -1, 1))
    return x[0, 0]


class SESS:
    """SESS, Saliency Enhancing with Scaling and Sliding (arXiv:2207.01769), around any CAM method.

    Per image: resize to each of ``scales`` (shorter side; default ``num_scales`` scales from the
    window size in steps of ``scale_step_ratio * window``), cut ``window_size`` windows every
    ``step_size`` pixels, score each window's target (on the softmax with ``use_softmax_scores``,
    clipped at 0), drop the ``pre_filter_ratio`` lowest-scoring windows, compute ``base_method``'s
    CAM of the others (``batch_size`` at a time), weight each by ``score / max score``, paste it back
    at its place and resize to the image, then fuse: the mean of the values above ``theta`` per pixel
    (``pool="mean"``) or the maximum (``"max"``); ``smooth`` applies a Gaussian blur (11x11,
    sigma 5). Result min-max scaled per image. All in torch on the model's device.
    """

    def __init__(self, model: nn.Module, target_layers: Sequence[Any], reshape_transform: Callable | None = None,
                 base_method: type[BaseCAM] = GradCAM, scales: Sequence[int] | None = None, num_scales: int = 12,
                 scale_step_ratio: float = 2.0 / 7.0, window_size: int | None = None, step_size: int | None = None,
                 pre_filter_ratio: float = 0.0, theta: float = 0.0, pool: str = "mean", smooth: bool = True,
                 use_softmax_scores: bool = True, batch_size: int = 32, **kwargs: Any) -> None:
        if pool not in ("mean", "max"):
            raise ValueError(f"pool has to be either 'mean' or 'max'. Got: {pool}.")
        if not 0.0 <= pre_filter_ratio < 1.0:
            raise ValueError(f"pre_filter_ratio has to be in [0, 1). Got: {pre_filter_ratio}.")
        if num_scales < 1:
            raise ValueError(f"num_scales has to be at least 1. Got: {num_scales}.")
        self.base_cam = base_method(model, target_layers, reshape_transform, **kwargs)
        self.model = model
        self.device = self.base_cam.device
        self.scales = scales
        self.num_scales = num_scales
        self.scale_step_ratio = scale_step_ratio
        self.window_size = window_size
        self.step_size = step_size
        self.pre_filter_ratio = pre_filter_ratio
        self.theta = theta
        self.pool = pool
        self.smooth = smooth
        self.use_softmax_scores = use_softmax_scores
        self.batch_size = batch_size

    def get_scales(self, window_size: int) -> list[int]:
        if self.scales is not None:
            return list(self.scales)
        step = int(round(window_size * self.scale_step_ratio))
        return [window_size + step * i for i in range(self.num_scales)]

    def explain(self, input_tensor: torch.Tensor, targets: Sequence[Any] | None = None,
                eigen_smooth: bool = False) -> torch.Tensor:
        """CAMs ``[B, H, W]`` in [0, 1] on the model's device; ``targets``: one per image or None."""
        x = input_tensor.detach().to(self.device)
        if targets is None:
            targets = [None] * x.shape[0]
        targets = list(targets)
        if len(targets) != x.shape[0]:
            raise ValueError(f"Expected one target per image. Got {len(targets)} targets for {x.shape[0]} images.")
        with eval_mode(self.model):
            cams = torch.stack([self._single(x[i : i + 1], target, eigen_smooth) for i, target in enumerate(targets)])
        return CF.scale_per_image(cams)

    def forward(self, input_tensor: torch.Tensor, targets: Sequence[Any] | None = None,
                eigen_smooth: bool = False) -> np.ndarray:
        """grad-cam's call: NumPy ``[B, H, W]``."""
        return self.explain(input_tensor, targets, eigen_smooth).cpu().numpy()

    __call__ = forward

    def _scores(self, patches: torch.Tensor, target: Any) -> torch.Tensor:
        values = []
        with torch.inference_mode():
            for start in range(0, len(patches), self.batch_size):
                outputs = model_scores(self.model(patches[start : start + self.batch_size])).float()
                if self.use_softmax_scores:
                    outputs = torch.softmax(outputs, dim=-1)
                values.append(torch.as_tensor(target(outputs)).float().reshape(-1))
        return torch.cat(values).clamp_min(0)

    def _single(self, image: torch.Tensor, target: Any, eigen_smooth: bool) -> torch.Tensor:
        height, width = image.shape[-2:]
        window = self.window_size if self.window_size is not None else min(height, width)
        step = self.step_size if self.step_size is not None else window
        if target is None:
            with torch.inference_mode():
                target = ClassifierOutputTarget(int(model_scores(self.model(image))[0].argmax()))
        patches, places = [], []
        for scale in self.get_scales(window):
            if scale < window:
                raise ValueError(f"Every scale has to be at least the window size {window}. Got: {scale}.")
            scaled = resize(image, scale)
            scaled_height, scaled_width = scaled.shape[-2:]
            for x1, y1 in sliding_window(scaled_height, scaled_width, step, window):
                patches.append(scaled[:, :, y1 : y1 + window, x1 : x1 + window])
                places.append((x1, y1, scaled_width, scaled_height))
        patches_t = torch.cat(patches)
        scores = self._scores(patches_t, target)
        order = torch.argsort(scores, stable=True)[int(len(scores) * self.pre_filter_ratio) :]
        top = scores[order[-1]]
        weights = scores[order] / top if top > 0 else torch.ones(len(order), device=scores.device)
        total = torch.zeros((height, width), device=image.device)
        counts = torch.zeros_like(total)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            cams = self.base_cam.explain(patches_t[chunk], [target] * len(chunk), eigen_smooth=eigen_smooth)
            for cam, weight, index in zip(cams, weights[start : start + self.batch_size], chunk.tolist()):
                pasted = self._paste(cam.to(total.device) * weight, places[index], (height, width))
                if self.pool == "max":
                    total = torch.maximum(total, pasted)
                else:
                    mask = pasted > self.theta
                    total = total + torch.where(mask, pasted, torch.zeros_like(pasted))
                    counts = counts + mask
        if self.pool == "mean":
            total = torch.where(counts > 0, total / counts.clamp_min(1), torch.zeros_like(total))
        return gaussian_blur(total) if self.smooth else total

    @staticmethod
    def _paste(cam: torch.Tensor, place: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
        """A window's CAM pasted at its place in the scaled image, resized to ``size`` (bilinear)."""
        x1, y1, scaled_width, scaled_height = place
        full = torch.zeros((scaled_height, scaled_width), device=cam.device, dtype=torch.float32)
        full[y1 : y1 + cam.shape[0], x1 : x1 + cam.shape[1]] = cam
        return CF.resize_maps(full[None], tuple(size))[0]

    def __enter__(self) -> SESS:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.base_cam.__exit__(*exc_info)
