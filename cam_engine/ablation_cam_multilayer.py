"""pytorch-grad-cam's module path ``ablation_cam_multilayer``: its experimental multi-layer AblationCAM.

[`cam_engine.AblationCAM`][cam_engine.AblationCAM] already ablates every target layer (each layer's channels, with the
others intact), so this path re-exports it, with the reference's wrapping `AblationLayer` and
layer-replacement helper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .perturbation import AblationCAM
from .utils.find_layers import replace_layer_recursive

__all__ = ["AblationCAM", "AblationLayer", "replace_layer_recursive"]


class AblationLayer(nn.Module):
    """Runs ``layer`` and ablates channel ``indices[i]`` of output copy ``i``: 0 when the output's
    minimum is 0, else ``min - 1e5`` (channels last with a ``reshape_transform``, as for ViTs)."""

    def __init__(self, layer: nn.Module, reshape_transform: Callable | None, indices: Sequence[int]) -> None:
        super().__init__()
        self.layer = layer
        self.reshape_transform = reshape_transform
        self.indices = indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.layer(x)
        if self.reshape_transform is not None:
            output = output.transpose(1, 2)
        for i in range(output.size(0)):
            low = torch.min(output)
            output[i, self.indices[i], :] = 0 if low == 0 else low - 1e5
        if self.reshape_transform is not None:
            output = output.transpose(2, 1)
        return output
