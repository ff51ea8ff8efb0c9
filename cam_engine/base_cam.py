"""pytorch-grad-cam's module path ``base_cam``: re-exports `cam_engine.core`."""

from .core import BaseCAM

__all__ = ["BaseCAM"]
