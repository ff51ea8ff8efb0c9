"""pytorch-grad-cam's ``BaseCAM`` extension points, for classes that subclass [`cam_engine.BaseCAM`][cam_engine.BaseCAM].

A grad-cam user writes a method by overriding one of these; they work the same here::

    class MyCAM(BaseCAM):
        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            return np.abs(grads).mean(axis=(2, 3))          # NumPy [B, C]

``get_cam_weights``, ``get_cam_image``, ``compute_cam_per_layer``, ``aggregate_multi_layers``,
``forward_augmentation_smoothing``, ``get_target_width_height`` and ``forward`` keep grad-cam's
signatures and NumPy types. A class that overrides any of them below the engine's own hook
([`BaseCAM.cam_image`][cam_engine.BaseCAM.cam_image]), or an instance built with ``compute_input_gradient=True``,
``detach=False`` or ``tta_transforms``, runs on the **extension path**: grad-cam's algorithm step
for step (a forward pass with hooks on the target layers, ``activations_and_grads.activations`` and
``.gradients`` as host NumPy arrays, per-layer CAMs in NumPy), with three of the engine's
guarantees kept: hooks live only during the call, the model's train/eval mode is restored, and
gradients are taken with ``torch.autograd.grad`` at the target layers (and at the input with
``compute_input_gradient``, left in ``input_tensor.grad`` as grad-cam does), never into
parameters' ``.grad``. Everything else runs on the engine's fast path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import functional as CF
from .image import scale_cam_image
from .model_utils import default_targets, eval_mode, model_scores

__all__ = ["GradCamExtension", "EXTENSION_POINTS", "to_numpy", "to_tensor"]

#: grad-cam's overridable methods; overriding one selects the extension path
EXTENSION_POINTS = (
    "get_cam_weights",
    "get_cam_image",
    "compute_cam_per_layer",
    "aggregate_multi_layers",
    "forward_augmentation_smoothing",
    "get_target_width_height",
    "forward",
)
#: the engine's own per-layer hooks; a class defining one of them is a fast-path method
ENGINE_HOOKS = ("cam_image", "pass_cam", "explain_batch")


def to_numpy(value: Any) -> np.ndarray:
    """A tensor (any device, with or without graph) or array as a NumPy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def to_tensor(value: Any) -> torch.Tensor:
    """A NumPy array or tensor as a float32 tensor (tensors keep their device, graph dropped)."""
    if isinstance(value, torch.Tensor):
        return value.detach().float()
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def _defining_index(cls: type, name: str) -> int | None:
    for index, klass in enumerate(cls.__mro__):
        if name in vars(klass):
            return index
    return None


class GradCamExtension:
    """The extension points of pytorch-grad-cam's ``BaseCAM`` (mixed into [`cam_engine.BaseCAM`][cam_engine.BaseCAM])."""

    compute_input_gradient: bool = False
    detach: bool = True
    tta_transforms: Any = None

    @classmethod
    def overrides_extension_points(cls) -> bool:
        """True when the class overrides a grad-cam extension point below its engine hook."""
        engine = min((i for i in (_defining_index(cls, h) for h in ENGINE_HOOKS) if i is not None), default=None)
        for name in EXTENSION_POINTS:
            index = _defining_index(cls, name)
            if index is not None and (engine is None or index < engine):
                return True
        return False

    def uses_extension_path(self) -> bool:
        """Whether calls of this instance run grad-cam's algorithm (see the module docstring)."""
        return (
            self.overrides_extension_points()
            or self.compute_input_gradient
            or not self.detach
            or self.tta_transforms is not None
        )

    # ------------------------------------------------------------------ grad-cam's hooks
    def get_cam_weights(
        self,
        input_tensor: torch.Tensor,
        target_layer: nn.Module,
        targets: Sequence[Any],
        activations: np.ndarray | torch.Tensor,
        grads: np.ndarray | torch.Tensor,
    ) -> np.ndarray:
        """Channel weights ``[B, C]`` (NumPy) for ``activations``/``grads`` ``[B, C, *S]``."""
        raise NotImplementedError("get_cam_weights must be implemented by subclass")

    def get_cam_image(
        self,
        input_tensor: torch.Tensor,
        target_layer: nn.Module,
        targets: Sequence[Any],
        activations: np.ndarray | torch.Tensor,
        grads: np.ndarray | torch.Tensor,
        eigen_smooth: bool = False,
    ) -> np.ndarray:
        """One layer's CAM ``[B, *S]`` (NumPy, before ReLU and scaling): ``sum_c w_c A_c`` with the
        weights of `get_cam_weights`, or the engine's `cam_image` for a method without them."""
        try:
            weights = self.get_cam_weights(input_tensor, target_layer, targets, activations, grads)
        except NotImplementedError:
            if _defining_index(type(self), "cam_image") == _defining_index(type(self), "get_cam_weights"):
                raise  # neither hook implemented
            act = to_tensor(activations)
            grad = None if grads is None else to_tensor(grads).to(act.device)
            return to_numpy(self.cam_image(act, grad, eigen_smooth))
        activations = to_numpy(activations)
        weights = to_numpy(weights)
        if activations.ndim not in (4, 5):
            raise ValueError(f"Invalid activation shape. Get {activations.ndim}.")
        weighted = weights.reshape(weights.shape + (1,) * (activations.ndim - 2)) * activations
        if eigen_smooth:
            return to_numpy(CF.project_2d(to_tensor(weighted)))
        return weighted.sum(axis=1)

    def get_target_width_height(self, input_tensor: torch.Tensor) -> tuple[int, ...]:
        """``(width, height)`` of a 4-D input, ``(depth, width, height)`` (last axes first) of a 5-D one."""
        if input_tensor.ndim == 4:
            return input_tensor.size(-1), input_tensor.size(-2)
        if input_tensor.ndim == 5:
            return input_tensor.size(-1), input_tensor.size(-2), input_tensor.size(-3)
        raise ValueError("Invalid input_tensor shape. Only 2D or 3D images are supported.")

    def compute_cam_per_layer(self, input_tensor: torch.Tensor, targets: Sequence[Any], eigen_smooth: bool) -> list[np.ndarray]:
        """Per target layer: the CAM, ReLU'd, scaled and resized to the input, NumPy ``[B, 1, *S]``."""
        recorded = self.activations_and_grads
        if self.detach:
            activations_list = [to_numpy(a) for a in recorded.activations]
            grads_list = [to_numpy(g) for g in recorded.gradients]
        else:
            activations_list, grads_list = list(recorded.activations), list(recorded.gradients)
        target_size = self.get_target_width_height(input_tensor)
        per_layer = []
        for index, target_layer in enumerate(self.target_layers):
            activations = activations_list[index] if index < len(activations_list) else None
            grads = grads_list[index] if index < len(grads_list) else None
            cam = np.maximum(to_numpy(self.get_cam_image(input_tensor, target_layer, targets, activations, grads,
                                                         eigen_smooth)), 0)
            per_layer.append(scale_cam_image(cam, target_size)[:, None, :])
        return per_layer

    def aggregate_multi_layers(self, cam_per_target_layer: Sequence[np.ndarray]) -> np.ndarray:
        """Mean over layers of the ReLU'd per-layer CAMs, min-max scaled: ``[B, *S]``."""
        stacked = np.maximum(np.concatenate(cam_per_target_layer, axis=1), 0)
        return scale_cam_image(np.mean(stacked, axis=1))

    def forward_augmentation_smoothing(
        self, input_tensor: torch.Tensor, targets: Sequence[Any] | None, eigen_smooth: bool = False
    ) -> np.ndarray:
        """Mean CAM over test-time augmentations, each de-augmented (``tta_transforms``: a ttach
        ``Compose``, or by default horizontal flip x brightness 0.9/1/1.1)."""
        cams = []
        if self.tta_transforms is not None:
            for transform in self.tta_transforms:
                cam = self.forward(transform.augment_image(input_tensor), targets, eigen_smooth)
                cam = transform.deaugment_mask(torch.from_numpy(np.float32(cam))[:, None]).numpy()[:, 0]
                cams.append(cam)
        else:
            for flip, factor in self.AUGMENTATIONS:
                augmented = (input_tensor.flip(-1) if flip else input_tensor) * factor
                cam = self.forward(augmented, targets, eigen_smooth)
                cams.append(cam[..., ::-1] if flip else cam)
        return np.mean(np.float32(cams), axis=0)

    def forward(self, input_tensor: torch.Tensor, targets: Sequence[Any] | None = None, eigen_smooth: bool = False) -> np.ndarray:
        """grad-cam's forward: NumPy ``[B, *S]``. On the fast path the same as ``explain``."""
        if not self.uses_extension_path():
            return self.explain(input_tensor, targets, eigen_smooth=eigen_smooth).cpu().numpy()
        return self.extension_forward(input_tensor, targets, eigen_smooth)

    # ------------------------------------------------------------------ the extension path
    def extension_forward(self, input_tensor: torch.Tensor, targets: Sequence[Any] | None, eigen_smooth: bool) -> np.ndarray:
        """grad-cam's ``BaseCAM.forward`` with hooks for this call only and no parameter gradients."""
        x = input_tensor.to(self.device)
        if self.compute_input_gradient:
            x = x.detach().requires_grad_(True)
        recorded = self.activations_and_grads
        recorded.detach = self.detach
        needs_graph = self.uses_gradients or self.compute_input_gradient
        with eval_mode(self.model), torch.set_grad_enabled(needs_graph), recorded.hooked():
            self.outputs = outputs = recorded(x)
        scores = model_scores(outputs)
        if targets is None:
            targets = default_targets(scores, x.shape[0])
        if self.uses_gradients:
            with torch.enable_grad():
                loss = sum(target(output) for target, output in zip(targets, scores))
                layer_outputs = [o for o in recorded.outputs if isinstance(o, torch.Tensor) and o.requires_grad]
                inputs = layer_outputs + ([x] if self.compute_input_gradient else [])
                grads = torch.autograd.grad(loss.sum() if isinstance(loss, torch.Tensor) else loss, inputs,
                                            retain_graph=True, create_graph=not self.detach, allow_unused=True)
                grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
            if self.compute_input_gradient:
                x.grad = grads[-1].detach()
            recorded.store_gradients(grads[: len(layer_outputs)])
        with eval_mode(self.model):
            cams = self.compute_cam_per_layer(x, targets, eigen_smooth)
            return self.aggregate_multi_layers(cams)
