"""pytorch-grad-cam"s module path ``shapley_cam``: re-exports :mod:`cam_engine.methods`."""

from .methods import ShapleyCAM

__all__ = ["ShapleyCAM"]
