"""pytorch-grad-cam's ``sobel_cam``: an edge map as a model-free baseline CAM."""

from __future__ import annotations

import numpy as np

__all__ = ["sobel_cam"]


def sobel_cam(img: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W]``: ``(|Sobel_x| + |Sobel_y|) / 2`` (3x3, saturated to uint8) of an RGB image's gray."""
    import cv2

    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    grad_x = cv2.convertScaleAbs(cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=3))
    grad_y = cv2.convertScaleAbs(cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=3))
    return cv2.addWeighted(grad_x, 0.5, grad_y, 0.5, 0)
