"""pytorch-grad-cam"s module path ``xgrad_cam``: re-exports :mod:`cam_engine.methods`."""

from .methods import XGradCAM

__all__ = ["XGradCAM"]
