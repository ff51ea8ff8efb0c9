"""pytorch-grad-cam's module path ``fem``: re-exports [`cam_engine.methods`][cam_engine.methods]."""

from .methods import FEM

__all__ = ["FEM"]
