"""pytorch-grad-cam's module path ``xgrad_cam``: re-exports [`cam_engine.methods`][cam_engine.methods]."""

from .methods import XGradCAM

__all__ = ["XGradCAM"]
