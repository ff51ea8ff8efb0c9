"""pytorch-grad-cam's module path ``grad_cam_plusplus``: re-exports [`cam_engine.methods`][cam_engine.methods]."""

from .methods import GradCAMPlusPlus

__all__ = ["GradCAMPlusPlus"]
