"""Deep Feature Factorization (Collins et al., ECCV 2018, arXiv:1806.10206).

The activations ``[B, C, h, w]`` of a layer, shifted per channel to be non-negative, are factorised
as ``A ~ W H`` (non-negative matrix factorisation, scikit-learn's ``NMF(init="random",
random_state=0)``, as pytorch-grad-cam): ``W + offset`` (``[C, K]``) are the concepts, ``H`` gives
``K`` heatmaps per image. scikit-learn is imported when DFF runs (``pip install scikit-learn``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..image import create_labels_legend, scale_cam_image, show_factorization_on_image
from ..layers import resolve_layers
from ..model_utils import eval_mode

__all__ = ["dff", "DeepFeatureFactorization", "run_dff_on_image"]


def dff(activations: np.ndarray, n_components: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Concepts ``[C, K]`` and heatmaps ``[B, K, h, w]`` of activations ``[B, C, h, w]`` (NaN -> 0)."""
    from sklearn.decomposition import NMF

    batch, channels, height, width = activations.shape
    flat = np.nan_to_num(activations.transpose((1, 0, 2, 3)), nan=0.0).reshape(channels, -1)
    offset = flat.min(axis=-1)
    model = NMF(n_components=n_components, init="random", random_state=0)
    weights = model.fit_transform(flat - offset[:, None])
    concepts = weights + offset[:, None]
    explanations = model.components_.reshape(n_components, batch, height, width).transpose((1, 0, 2, 3))
    return concepts, explanations


class DeepFeatureFactorization:
    """``DeepFeatureFactorization(model, target_layer, reshape_transform, computation_on_concepts)``.

    Calling it with ``(input_tensor [B, 3, H, W], n_components)`` returns ``(concepts [C, K],
    heatmaps: B arrays [K, H, W] in [0, 1])``, plus ``computation_on_concepts(concepts.T)`` as NumPy
    when that callable (e.g. the model's classifier head) is given. One forward pass under
    ``inference_mode`` in eval mode; no hook outlives the call.
    """

    def __init__(self, model: nn.Module, target_layer: Any, reshape_transform: Callable | None = None,
                 computation_on_concepts: Callable | None = None) -> None:
        self.model = model
        self.target_layer = resolve_layers(model, [target_layer])[0]
        self.reshape_transform = reshape_transform
        self.computation_on_concepts = computation_on_concepts

    def activations(self, input_tensor: torch.Tensor) -> np.ndarray:
        """The target layer's (reshaped) activations ``[B, C, h, w]`` as float32 NumPy."""
        captured = []
        handle = self.target_layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            with eval_mode(self.model), torch.inference_mode():
                self.model(input_tensor)
        finally:
            handle.remove()
        output = captured[0]
        if self.reshape_transform is not None:
            output = self.reshape_transform(output)
        return output.float().cpu().numpy()

    def __call__(self, input_tensor: torch.Tensor, n_components: int = 16):
        height, width = input_tensor.shape[-2:]
        concepts, explanations = dff(self.activations(input_tensor), n_components=n_components)
        heatmaps = [scale_cam_image(maps, (width, height)) for maps in explanations]
        if self.computation_on_concepts is None:
            return concepts, heatmaps
        with torch.inference_mode():
            outputs = self.computation_on_concepts(torch.from_numpy(np.float32(concepts).T)).cpu().numpy()
        return concepts, heatmaps, outputs

    def __enter__(self) -> DeepFeatureFactorization:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None


def run_dff_on_image(model: nn.Module, target_layer: Any, classifier: Callable, img_pil: Any,
                     img_tensor: torch.Tensor, reshape_transform: Callable | None = None, n_components: int = 5,
                     top_k: int = 2) -> np.ndarray:
    """One image's DFF picture: the image beside its concept map with a legend of each concept's
    ``top_k`` labels (``model.config.id2label``, a HuggingFace model). uint8 RGB."""
    rgb = np.array(img_pil) / 255
    factorization = DeepFeatureFactorization(model, target_layer, reshape_transform, classifier)
    _, heatmaps, outputs = factorization(img_tensor[None, :], n_components)
    scores = torch.softmax(torch.from_numpy(outputs), dim=-1).numpy()
    labels = create_labels_legend(scores, labels=model.config.id2label, top_k=top_k)
    visual = show_factorization_on_image(rgb, heatmaps[0], image_weight=0.3, concept_labels=labels)
    return np.hstack((np.array(img_pil), visual))
