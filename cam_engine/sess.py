"""pytorch-grad-cam"s module path ``sess``: re-exports :mod:`cam_engine.meta`."""

from .meta import SESS, sliding_window, window_starts

__all__ = ["SESS", "sliding_window", "window_starts"]
