"""pytorch-grad-cam's module path ``random_cam``: re-exports `cam_engine.baselines`."""

from .baselines import RandomCAM

__all__ = ["RandomCAM"]
