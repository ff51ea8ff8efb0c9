"""pytorch-grad-cam's module path ``seg_eigen_cam``: re-exports [`cam_engine.methods`][cam_engine.methods]."""

from .methods import SegEigenCAM

__all__ = ["SegEigenCAM"]
