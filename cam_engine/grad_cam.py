"""pytorch-grad-cam"s module path ``grad_cam``: re-exports :mod:`cam_engine.methods`."""

from .methods import GradCAM

__all__ = ["GradCAM"]
