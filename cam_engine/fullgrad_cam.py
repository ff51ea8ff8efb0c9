"""pytorch-grad-cam's module path ``fullgrad_cam``: re-exports [`cam_engine.fullgrad`][cam_engine.fullgrad]."""

from .fullgrad import FullGrad

__all__ = ["FullGrad"]
