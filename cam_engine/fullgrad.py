"""FullGrad (Srinivas & Fleuret, NeurIPS 2019): input-gradient plus bias-gradient saliency.

For input ``x`` (``[B, 3, H, W]``), target score ``y`` and every ``Conv2d``/``BatchNorm2d`` layer
``l`` with a bias (``b_l``, ``[C_l]``; a BatchNorm's effective bias is
``beta - mu * gamma / sqrt(var + eps)``) and output ``z_l`` (``[B, C_l, h_l, w_l]``)::

    cam = scale( sum_k scale(|x_k * dy/dx_k|) + sum_l up( sum_c scale(|b_lc * dy/dz_lc|) ) )

where ``scale`` min-max scales each ``[h, w]`` map to [0, 1] (per image and channel) and ``up`` is a
bilinear resize to ``H x W``. Because ``up`` is linear and acts per map, the channel sum is taken at
the layer's own resolution and resized once per layer (the reference resizes every channel).

Beyond the reference, a BatchNorm fused with its activation (timm's ``BatchNormAct2d``: batch norm,
dropout and activation in one ``BatchNorm2d`` subclass, as in EfficientNet-Lite0) is a bias layer too:
its ``z_l`` is the batch norm's own output, read where it enters the activation. The reference takes
exact ``Conv2d``/``BatchNorm2d`` types only, so on such a model it finds no BatchNorm bias at all
(none at all on EfficientNet-Lite0, whose convolutions have no bias); models of plain layers are
treated exactly as the reference treats them.

Gradients are taken with ``torch.autograd.grad(y, x)``; the gradients at the layer outputs are read
by tensor hooks on those outputs during that same backward pass (they see the gradient of the
layer's own output even when an in-place ReLU later overwrites it, as grad-cam's hooks do). No
parameter ``.grad`` is filled and the model is unchanged: hooks live only during a call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as CF
from .core import BaseCAM, CAMResult
from .model_utils import default_targets, map_structure, model_scores
from .registry import register

__all__ = ["FullGrad", "bias_layers", "effective_bias", "fused_activation"]


def fused_activation(layer: nn.Module) -> nn.Module | None:
    """The activation module of a BatchNorm fused with it (timm's ``BatchNormAct2d``), else None."""
    if type(layer) is nn.BatchNorm2d or not isinstance(layer, nn.BatchNorm2d):
        return None
    act = getattr(layer, "act", None)
    return act if isinstance(act, nn.Module) else None


def bias_layers(model: nn.Module) -> list[nn.Module]:
    """Every ``nn.Conv2d`` / ``nn.BatchNorm2d`` (exact types, as grad-cam) and every BatchNorm fused
    with its activation, with a bias, in grad-cam's pre-order."""
    found: list[nn.Module] = []
    for layer in model._modules.values():
        if layer is None:
            continue
        exact = type(layer) in (nn.Conv2d, nn.BatchNorm2d)
        if (exact or fused_activation(layer) is not None) and layer.bias is not None:
            found.append(layer)
        found.extend(bias_layers(layer))
    return found


def effective_bias(layer: nn.Module) -> torch.Tensor:
    """``[C]``: a conv's bias, or a BatchNorm's ``beta - running_mean * gamma / sqrt(running_var + eps)``."""
    with torch.no_grad():
        if isinstance(layer, nn.BatchNorm2d):
            if layer.running_mean is None:
                return layer.bias.detach().float()
            gamma = layer.weight if layer.weight is not None else torch.ones_like(layer.running_mean)
            return (layer.bias - layer.running_mean * gamma / torch.sqrt(layer.running_var + layer.eps)).float()
        return layer.bias.detach().float()


def _scale_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale every ``[h, w]`` map of ``[B, C, h, w]``: ``(m - min) / (max(m - min) + 1e-7)``."""
    batch, channels = maps.shape[:2]
    return CF.scale_per_image(maps.reshape(batch * channels, *maps.shape[2:])).reshape(maps.shape)


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


@register("fullgrad")
class FullGrad(BaseCAM):
    """FullGrad saliency; ``target_layers`` is accepted for the common signature and ignored.

    Every ``Conv2d``/``BatchNorm2d`` with a bias contributes, as in grad-cam 1.5.7, and every BatchNorm
    fused with its activation (see the module docstring). With
    ``eigen_smooth`` the per-term maps (3 input channels + one per layer) are scaled to 1/8 of the
    input size, projected on their first principal component and resized back.
    """

    uses_gradients = True

    def __init__(self, model: nn.Module, target_layers: Sequence[Any] | None = None,
                 reshape_transform: Callable | None = None) -> None:
        layers = bias_layers(model)
        if not layers:
            raise ValueError("FullGrad needs at least one Conv2d or BatchNorm2d layer with a bias")
        super().__init__(model, layers, reshape_transform)

    def explain_batch(self, x: torch.Tensor, targets: list[list[Any]] | None, eigen_smooth: bool) -> CAMResult:
        batch = x.shape[0]
        size = tuple(x.shape[2:])
        if len(size) != 2:
            raise ValueError("FullGrad supports 2-D images [B, C, H, W]")
        biases = [effective_bias(layer).to(x.device) for layer in self.target_layers]
        calls: list[tuple[int, torch.Tensor]] = []  # (layer index, output) per layer call
        grads: dict[int, torch.Tensor] = {}

        def make_hook(layer_index: int):
            def hook(module, inputs, output):
                if isinstance(output, torch.Tensor) and output.requires_grad:
                    slot = len(calls)
                    calls.append((layer_index, output))

                    def store(grad: torch.Tensor) -> None:
                        grads[slot] = grad.detach()

                    output.register_hook(store)

            return hook

        leaf = x.detach().requires_grad_(True)
        handles = []
        for index, layer in enumerate(self.target_layers):
            activation = fused_activation(layer)
            if activation is None:
                handles.append(layer.register_forward_hook(make_hook(index)))
                continue
            # A fused BatchNorm's own output is what enters its activation: hooked before the
            # activation runs, so an in-place activation cannot overwrite it first.
            hook = make_hook(index)
            handles.append(activation.register_forward_pre_hook(
                lambda module, inputs, hook=hook: hook(module, inputs, inputs[0] if inputs else None)))  # fmt: skip
        try:
            with torch.enable_grad(), self.forward_context():
                outputs = self.model(leaf)
        finally:
            for handle in handles:
                handle.remove()
        scores = model_scores(outputs)
        if isinstance(scores, torch.Tensor) and scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        if targets is None:
            targets = [[t] for t in default_targets(scores, batch)]
        pairs = [(i, t) for i in range(batch) for t in range(len(targets[i]))]

        def depth_cams(depth_index: int, images: list[int], losses: list[torch.Tensor]) -> torch.Tensor:
            grads.clear()
            (input_grad,) = torch.autograd.grad(losses[depth_index], leaf, retain_graph=depth_index < len(losses) - 1)
            rows = torch.tensor(images, device=x.device)
            return self._saliency(leaf.detach()[rows], input_grad[rows], calls, grads, biases, rows, size, eigen_smooth)

        cams = self.cams_per_target(scores, targets, size, x.device, depth_cams)
        calls.clear()
        grads.clear()
        return CAMResult(cams, pairs, map_structure(outputs, lambda t: t.detach()), targets)

    def _saliency(self, x, input_grad, calls, grads, biases, rows, size, eigen_smooth) -> torch.Tensor:
        """The FullGrad map ``[n, H, W]`` in [0, 1] for the batch rows ``rows``."""
        terms = [_scale_maps((input_grad.float() * x.float()).abs())]  # [n, 3, H, W]
        for slot, (layer_index, output) in enumerate(calls):
            grad = grads.get(slot)
            if grad is None:
                grad = torch.zeros_like(output)
            grad = grad[rows].float()
            bias = biases[layer_index].reshape(1, -1, *([1] * (grad.ndim - 2)))
            per_channel = _scale_maps((bias * grad).abs())
            terms.append(_resize(per_channel.sum(dim=1, keepdim=True), size))
        if eigen_smooth:
            stacked = torch.cat(terms, dim=1)  # [n, 3 + L, H, W]
            small = (max(size[0] // 8, 1), max(size[1] // 8, 1))
            stacked = _resize(_scale_maps(stacked), small)
            projected = CF.project_2d(stacked)[:, None]
            total = _resize(_scale_maps(projected), size)[:, 0]
        else:
            total = sum(t.sum(dim=1) for t in terms)
        return CF.scale_per_image(total)
