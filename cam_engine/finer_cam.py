"""pytorch-grad-cam's module path ``finer_cam``: re-exports [`cam_engine.methods`][cam_engine.methods]."""

from .methods import FinerCAM

__all__ = ["FinerCAM"]
