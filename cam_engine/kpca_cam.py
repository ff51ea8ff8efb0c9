"""pytorch-grad-cam's module path ``kpca_cam``: re-exports [`cam_engine.methods`][cam_engine.methods]."""

from .methods import KPCA_CAM

__all__ = ["KPCA_CAM"]
