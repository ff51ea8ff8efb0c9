"""pytorch-grad-cam's module path ``eigen_cam``: re-exports [`cam_engine.methods`][cam_engine.methods]."""

from .methods import EigenCAM

__all__ = ["EigenCAM"]
