"""pytorch-grad-cam's module path ``refine_cam``: re-exports [`cam_engine.meta`][cam_engine.meta]."""

from .meta import RefineCAM

__all__ = ["RefineCAM"]
