"""pytorch-grad-cam"s module path ``hirescam``: re-exports :mod:`cam_engine.methods`."""

from .methods import HiResCAM

__all__ = ["HiResCAM"]
