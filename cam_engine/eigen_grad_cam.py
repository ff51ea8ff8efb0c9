"""pytorch-grad-cam's module path ``eigen_grad_cam``: re-exports [`cam_engine.methods`][cam_engine.methods]."""

from .methods import EigenGradCAM

__all__ = ["EigenGradCAM"]
