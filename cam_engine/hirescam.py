"""pytorch-grad-cam's module path ``hirescam``: re-exports [`cam_engine.methods`][cam_engine.methods]."""

from .methods import HiResCAM

__all__ = ["HiResCAM"]
