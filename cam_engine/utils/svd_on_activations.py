"""pytorch-grad-cam's ``utils.svd_on_activations``: NumPy wrappers of [`cam_engine.functional`][cam_engine.functional].

Each takes ``[B, C, *S]`` (NaNs count as 0; the caller's array is not modified) and returns float32
``[B, *S]``. The SVD's sign is fixed so that the largest-magnitude value is positive in all three
(grad-cam leaves ``get_2d_projection``'s sign to the SVD routine).
"""

from __future__ import annotations

import numpy as np
import torch

from ..functional import kernel_project_2d, project_2d

__all__ = ["get_2d_projection", "get_2d_projection_kernel", "get_2d_projection_with_sign_correction"]


def _tensor(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(batch, dtype=np.float32, copy=True))


def get_2d_projection(activation_batch: np.ndarray) -> np.ndarray:
    """Projection on the first principal component of each image's centred positions x channels matrix."""
    return np.float32(project_2d(_tensor(activation_batch)).numpy())


def get_2d_projection_with_sign_correction(activation_batch: np.ndarray) -> np.ndarray:
    """Seg-Eigen-CAM's projection: as `get_2d_projection`, flipped when ``|min| > |max|``."""
    return np.float32(project_2d(_tensor(activation_batch)).numpy())


def get_2d_projection_kernel(activation_batch: np.ndarray, kernel: str = "sigmoid", gamma: float | None = None) -> np.ndarray:
    """First kernel-PCA component (scikit-learn's ``KernelPCA(n_components=1)`` definition)."""
    return np.float32(kernel_project_2d(_tensor(activation_batch), kernel, gamma).numpy())
