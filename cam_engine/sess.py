"""pytorch-grad-cam's module path ``sess``: re-exports [`cam_engine.meta`][cam_engine.meta]."""

from .meta import SESS, sliding_window, window_starts

__all__ = ["SESS", "sliding_window", "window_starts"]
