"""pytorch-grad-cam's module path ``layer_cam``: re-exports [`cam_engine.methods`][cam_engine.methods]."""

from .methods import LayerCAM

__all__ = ["LayerCAM"]
