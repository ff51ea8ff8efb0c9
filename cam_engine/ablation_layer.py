"""pytorch-grad-cam's ablation layers, and the contract [`cam_engine.AblationCAM`][cam_engine.AblationCAM] honours.

``AblationCAM(..., ablation_layer=layer)``: the built-in layers (`AblationLayer`,
`AblationLayerVit`, `AblationLayerFasterRCNN`) select the engine's batched ablation
(same values: a tensor channel is set to 0, or to ``min - 1e7`` offsets when the layer's minimum is
not 0; a ViT's channel axis is its last; an FPN dict's channel is set to -1000). Any other object
with grad-cam's interface is used as the reference uses it: per image, ``activations_to_be_ablated
(activations[i], ratio)`` picks the channels, ``set_next_batch(i, layer_output, n)`` prepares ``n``
copies, and ``layer(x)`` returns them; its output replaces the target layer's output through a
forward hook for that pass (the model itself is never modified).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from .functional import project_2d

__all__ = ["AblationLayer", "AblationLayerVit", "AblationLayerFasterRCNN"]


class AblationLayer(torch.nn.Module):
    """Ablates channel ``indices[i]`` of copy ``i`` of one image's activations ``[C, h, w]``."""

    engine_native = True  # AblationCAM runs its batched ablation for this class (not for subclasses)

    def objectiveness_mask_from_svd(self, activations: np.ndarray, threshold: float = 0.01) -> np.ndarray:
        """Binary ``[h, w]`` mask: ``|first principal component|`` scaled to [0, 1], above ``threshold``."""
        projection = np.abs(project_2d(torch.as_tensor(np.float32(activations))[None]).numpy()[0])
        projection = projection - projection.min()
        return projection / projection.max() > threshold

    def activations_to_be_ablated(self, activations: np.ndarray, ratio_channels_to_ablate: float = 1.0) -> np.ndarray:
        """The channels to ablate for one image (all of them when the ratio is 1)."""
        activations = activations.detach().cpu().numpy() if isinstance(activations, torch.Tensor) else activations
        if ratio_channels_to_ablate == 1.0:
            self.indices = np.int32(range(activations.shape[0]))
            return self.indices
        projection = self.objectiveness_mask_from_svd(activations)
        scores = []
        for channel in activations:
            normalized = np.abs(channel)
            normalized = normalized - normalized.min()
            normalized = normalized / np.max(normalized)
            scores.append((projection * normalized).sum() / normalized.sum())
        indices = list(np.argsort(np.float32(scores)))
        count = int(len(indices) * ratio_channels_to_ablate)
        self.indices = np.int32(indices[::-1][:count] + indices[:count])
        return self.indices

    def set_next_batch(self, input_batch_index: int, activations: Any, num_channels_to_ablate: int) -> None:
        """``num_channels_to_ablate`` copies of image ``input_batch_index``'s activations."""
        self.activations = activations[input_batch_index].clone().unsqueeze(0).repeat(
            num_channels_to_ablate, *([1] * (activations.ndim - 1)))

    def __call__(self, x: Any) -> Any:
        output = self.activations
        for i in range(output.size(0)):
            if torch.min(output) == 0:
                output[i, self.indices[i], :] = 0
            else:
                output[i, self.indices[i], :] = torch.min(output) - 1e7
        return output


class AblationLayerVit(AblationLayer):
    """For token outputs ``[N, C]`` per image: the channel axis is the last one."""

    engine_native = True

    def __call__(self, x: Any) -> Any:
        output = self.activations.transpose(1, self.activations.ndim - 1)
        for i in range(output.size(0)):
            if torch.min(output) == 0:
                output[i, self.indices[i], :] = 0
            else:
                output[i, self.indices[i], :] = torch.min(output) - 1e7
        return output.transpose(output.ndim - 1, 1)


class AblationLayerFasterRCNN(AblationLayer):
    """For a detector's FPN dict (levels ``'0'..'3', 'pool'`` of 256 channels): set to -1000."""

    engine_native = True

    def set_next_batch(self, input_batch_index: int, activations: Any, num_channels_to_ablate: int) -> None:
        self.activations = OrderedDict(
            (key, value[input_batch_index].clone().unsqueeze(0).repeat(num_channels_to_ablate, 1, 1, 1))
            for key, value in activations.items()
        )

    def __call__(self, x: Any) -> Any:
        result = self.activations
        layers = {0: "0", 1: "1", 2: "2", 3: "3", 4: "pool"}
        for i in range(result["pool"].size(0)):
            result[layers[int(self.indices[i] // 256)]][i, int(self.indices[i] % 256), :, :] = -1000
        return result
