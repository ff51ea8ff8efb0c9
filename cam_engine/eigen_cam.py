"""pytorch-grad-cam"s module path ``eigen_cam``: re-exports :mod:`cam_engine.methods`."""

from .methods import EigenCAM

__all__ = ["EigenCAM"]
