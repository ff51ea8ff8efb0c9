"""pytorch-grad-cam's ``ActivationsAndGradients``: record a layer's outputs and their gradients.

``ActivationsAndGradients(model, target_layers, reshape_transform, detach=True)`` registers forward
hooks on ``target_layers`` when it is built (as grad-cam's does); calling it runs the model and
records each target layer's output in ``activations`` (reshaped, detached and on the host when
``detach``); a later ``loss.backward()`` fills ``gradients`` in the same order. ``release()`` removes
the hooks. The CAM classes of [`cam_engine`][cam_engine] do not leave hooks on a model: their
``activations_and_grads`` is built with ``persistent=False`` and hooks only for the duration of a
call on the extension path (see `cam_engine.extension.GradCamExtension`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ActivationsAndGradients"]


class ActivationsAndGradients:
    """Forward hooks that keep the target layers' activations and (through tensor hooks) gradients."""

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: Callable[[Any], torch.Tensor] | None,
        detach: bool = True,
        persistent: bool = True,
    ) -> None:
        self.model = model
        self.target_layers = list(target_layers)
        self.reshape_transform = reshape_transform
        self.detach = detach
        self.gradients: list[Any] = []
        self.activations: list[Any] = []
        #: the raw (not reshaped, not detached) layer outputs of the last forward pass
        self.outputs: list[Any] = []
        self.handles: list[Any] = []
        if persistent:
            self.register()

    def register(self, gradients: bool = True) -> None:
        """Register the forward hooks (``gradients``: also the tensor hooks that record gradients)."""
        for layer in self.target_layers:
            self.handles.append(layer.register_forward_hook(self.save_activation))
            if gradients:
                self.handles.append(layer.register_forward_hook(self.save_gradient))

    @contextlib.contextmanager
    def hooked(self, gradients: bool = False) -> Iterator[ActivationsAndGradients]:
        """Hooks registered for the block only."""
        self.register(gradients)
        try:
            yield self
        finally:
            self.remove_hooks()

    def save_activation(self, module: nn.Module, input: Any, output: Any) -> None:
        self.outputs.append(output)
        activation = output
        if self.detach:
            if self.reshape_transform is not None:
                activation = self.reshape_transform(activation)
            self.activations.append(activation.cpu().detach())
        else:
            self.activations.append(activation)

    def save_gradient(self, module: nn.Module, input: Any, output: Any) -> None:
        if not getattr(output, "requires_grad", False):
            return  # only tensors that require grad take hooks

        def store(grad: torch.Tensor) -> None:  # gradients arrive in reverse order
            if self.detach:
                if self.reshape_transform is not None:
                    grad = self.reshape_transform(grad)
                self.gradients = [grad.cpu().detach()] + self.gradients
            else:
                self.gradients = [grad] + self.gradients

        output.register_hook(store)

    def store_gradients(self, grads: Sequence[torch.Tensor]) -> None:
        """Set ``gradients`` from gradients taken at ``outputs`` (reshaped and detached like the activations)."""
        if self.detach:
            shaped = [self.reshape_transform(g) if self.reshape_transform is not None else g for g in grads]
            self.gradients = [g.cpu().detach() for g in shaped]
        else:
            self.gradients = list(grads)

    def __call__(self, x: torch.Tensor) -> Any:
        self.gradients = []
        self.activations = []
        self.outputs = []
        return self.model(x)

    def clear(self) -> None:
        for tensor in self.activations + self.gradients:
            if isinstance(tensor, torch.Tensor):
                tensor.detach_()
        self.activations.clear()
        self.gradients.clear()
        self.outputs = []

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def release(self) -> None:
        """Drop what was recorded and remove the hooks."""
        self.clear()
        self.remove_hooks()
