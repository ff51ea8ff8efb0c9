"""pytorch-grad-cam's module path ``grad_cam_elementwise``: re-exports [`cam_engine.methods`][cam_engine.methods]."""

from .methods import GradCAMElementWise

__all__ = ["GradCAMElementWise"]
