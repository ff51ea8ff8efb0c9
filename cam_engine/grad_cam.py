"""pytorch-grad-cam's module path ``grad_cam``: re-exports [`cam_engine.methods`][cam_engine.methods]."""

from .methods import GradCAM

__all__ = ["GradCAM"]
