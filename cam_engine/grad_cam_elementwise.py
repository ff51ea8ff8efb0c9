"""pytorch-grad-cam"s module path ``grad_cam_elementwise``: re-exports :mod:`cam_engine.methods`."""

from .methods import GradCAMElementWise

__all__ = ["GradCAMElementWise"]
