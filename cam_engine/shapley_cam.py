"""pytorch-grad-cam's module path ``shapley_cam``: re-exports [`cam_engine.methods`][cam_engine.methods]."""

from .methods import ShapleyCAM

__all__ = ["ShapleyCAM"]
