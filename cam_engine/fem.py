"""pytorch-grad-cam"s module path ``fem``: re-exports :mod:`cam_engine.methods`."""

from .methods import FEM

__all__ = ["FEM"]
