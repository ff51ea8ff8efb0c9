"""pytorch-grad-cam"s module path ``eigen_grad_cam``: re-exports :mod:`cam_engine.methods`."""

from .methods import EigenGradCAM

__all__ = ["EigenGradCAM"]
