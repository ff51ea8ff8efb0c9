"""pytorch-grad-cam"s module path ``refine_cam``: re-exports :mod:`cam_engine.meta`."""

from .meta import RefineCAM

__all__ = ["RefineCAM"]
