"""Helpers to compare cam_engine with the oracle, pytorch-grad-cam 1.5.7 (test-only dependency)."""

from __future__ import annotations

import numpy as np
import pytest

import_error = None
try:
    import pytorch_grad_cam
    import pytorch_grad_cam.base_cam
    import pytorch_grad_cam.eigen_cam
    import pytorch_grad_cam.eigen_grad_cam
    import pytorch_grad_cam.grad_cam_elementwise
    import pytorch_grad_cam.hirescam
    import pytorch_grad_cam.layer_cam
    from pytorch_grad_cam.utils import svd_on_activations
except ImportError as error:  # pragma: no cover - the test extra installs it
    import_error = error

_PROJECTION_USERS = (
    "base_cam",
    "eigen_cam",
    "eigen_grad_cam",
    "grad_cam_elementwise",
    "hirescam",
    "layer_cam",
)


def sign_aligned_projection(batch: np.ndarray) -> np.ndarray:
    """The reference's first-principal-component projection, with its arbitrary SVD sign fixed the way
    cam_engine fixes it (largest-magnitude entry positive). Only the sign is touched."""
    projections = _original_projection(batch)
    for i, projection in enumerate(projections):
        if projection.ravel()[np.abs(projection).argmax()] < 0:
            projections[i] = -projection
    return projections


_original_projection = svd_on_activations.get_2d_projection if import_error is None else None


def oracle_module(monkeypatch):
    """The pytorch_grad_cam module, with eigen projections sign-aligned (see above).

    Used through the ``oracle`` fixture of ``tests/conftest.py``."""
    if import_error is not None:
        pytest.fail(f"the oracle grad-cam==1.5.7 is not installed: {import_error}")
    for name in _PROJECTION_USERS:
        monkeypatch.setattr(getattr(pytorch_grad_cam, name), "get_2d_projection", sign_aligned_projection)
    return pytorch_grad_cam


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image Pearson correlation of two ``[B, H, W]`` stacks."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-30)
