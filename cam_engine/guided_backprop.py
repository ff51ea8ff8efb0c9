"""Guided backpropagation (Springenberg et al., 2015) for a whole batch, without touching the model.

At every ``nn.ReLU`` module the backward pass lets through only positive gradients at positive
inputs: ``dL/dx = (x > 0) * relu(dL/dy)``. grad-cam 1.5.7 swaps the model's ReLU modules for a
custom function and back; here a forward hook on each ``nn.ReLU`` registers a tensor hook
``g -> relu(g)`` on the module's output for the duration of one call, and the ReLU's own backward
multiplies by ``(x > 0)``. Beyond the reference, ``nn.ReLU6`` modules (MobileNets,
EfficientNet-Lite) are guided the same way, ``dL/dx = (0 < x < 6) * relu(dL/dy)``; the reference
leaves them plain, so on such a model its "guided" map is mostly the raw gradient. Functional
``F.relu`` calls are not ReLU modules and stay plain, as in the reference. Only ``dL/d input`` is
computed (``torch.autograd.grad``): no parameter ``.grad``.

Guided Grad-CAM is the product of a CAM and the guided map::

    cam = GradCAM(model, [model.layer4[-1]])(x)            # [B, H, W]
    guided = GuidedBackpropReLUModel(model)(x)             # [B, H, W, 3] (or [H, W, 3] for B = 1)
    guided_gradcam = deprocess_image(cam[..., None] * guided)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .image import deprocess_image
from .model_utils import eval_mode, model_device_dtype, model_scores
from .targets import ClassifierOutputTarget

__all__ = ["GuidedBackpropReLU", "GuidedBackpropReLUasModule", "GuidedBackpropReLUModel", "guided_gradcam",
           "deprocess_image"]


class GuidedBackpropReLU(torch.autograd.Function):
    """ReLU whose backward passes ``(x > 0) * relu(grad)`` (pytorch-grad-cam's autograd function)."""

    @staticmethod
    def forward(ctx: Any, input_img: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(input_img)
        return input_img.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (input_img,) = ctx.saved_tensors
        return grad_output.clamp_min(0) * (input_img > 0).to(grad_output.dtype)


class GuidedBackpropReLUasModule(nn.Module):
    """`GuidedBackpropReLU` as a module (to swap into a model by hand, as grad-cam does)."""

    def forward(self, input_img: torch.Tensor) -> torch.Tensor:
        return GuidedBackpropReLU.apply(input_img)


def _positive_gradient_hook(module: nn.Module, inputs: Any, output: Any) -> None:
    if isinstance(output, torch.Tensor) and output.requires_grad:
        output.register_hook(lambda grad: grad.clamp_min(0))


class GuidedBackpropReLUModel:
    """``GuidedBackpropReLUModel(model, device=None)``; call it with ``(input_img, target_category)``.

    ``device``: where to run; when the model lives elsewhere a private copy is moved there (the
    caller's model is never moved, switched to eval or modified). The model runs in eval mode for the
    call, restored afterwards.
    """

    def __init__(self, model: nn.Module, device: str | torch.device | None = None) -> None:
        model_device, _ = model_device_dtype(model)
        if device is not None and torch.device(device) != model_device:
            model = copy.deepcopy(model).to(device)
        self.model = model
        self.device = torch.device(device) if device is not None else model_device

    def forward(self, input_img: torch.Tensor) -> Any:
        return self.model(input_img)

    def explain(self, input_img: torch.Tensor, targets: Sequence[Any] | int | None = None) -> torch.Tensor:
        """Guided-backprop gradients ``[B, C, H, W]`` (float32, on the model's device).

        ``targets``: None (each image's top class), one class index for every image, a list of class
        indices, or a list of target callables (one per image, as for the CAM methods).
        """
        x = input_img.to(self.device).detach().requires_grad_(True)
        relus = [m for m in self.model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
        handles = [m.register_forward_hook(_positive_gradient_hook) for m in relus]
        try:
            with eval_mode(self.model), torch.enable_grad():
                scores = model_scores(self.forward(x))
                batch = x.shape[0]
                if targets is None:
                    flat = scores.reshape(batch, -1)
                    resolved = [ClassifierOutputTarget(int(c)) for c in flat.argmax(dim=1).tolist()]
                elif isinstance(targets, (int, np.integer)):
                    resolved = [ClassifierOutputTarget(int(targets))] * batch
                else:
                    resolved = [ClassifierOutputTarget(int(t)) if isinstance(t, (int, np.integer)) else t for t in targets]
                    if len(resolved) != batch:
                        raise ValueError(f"got {len(resolved)} targets for a batch of {batch} images")
                loss = sum(target(scores[i]).sum() for i, target in enumerate(resolved))
                (grad,) = torch.autograd.grad(loss, x)
        finally:
            for handle in handles:
                handle.remove()
        return grad.float()

    def __call__(self, input_img: torch.Tensor, target_category: Sequence[Any] | int | None = None) -> np.ndarray:
        """grad-cam's call, for the whole batch: NumPy ``[B, H, W, C]``; ``[H, W, C]`` when ``B == 1``.

        (grad-cam 1.5.7 returns ``[H, W, C]`` for the first image only, whatever the batch.)
        """
        grads = self.explain(input_img, target_category).permute(0, 2, 3, 1).cpu().numpy()
        return grads[0] if grads.shape[0] == 1 else grads


def guided_gradcam(cams: torch.Tensor | np.ndarray, guided: torch.Tensor | np.ndarray) -> np.ndarray:
    """Guided Grad-CAM images: ``deprocess_image(cam[..., None] * guided)`` per image.

    ``cams``: ``[B, H, W]`` (or ``[H, W]``); ``guided``: ``[B, H, W, C]`` (or ``[H, W, C]``).
    Returns uint8 ``[B, H, W, C]`` (or ``[H, W, C]``).
    """
    cams = cams.detach().cpu().numpy() if isinstance(cams, torch.Tensor) else np.asarray(cams)
    guided = guided.detach().cpu().numpy() if isinstance(guided, torch.Tensor) else np.asarray(guided)
    product = cams[..., None] * guided
    if product.ndim == 3:
        return deprocess_image(product)
    return np.stack([deprocess_image(p) for p in product])
