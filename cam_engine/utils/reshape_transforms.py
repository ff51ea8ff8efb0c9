"""pytorch-grad-cam's module path ``utils.reshape_transforms``: re-exports [`cam_engine.reshape`][cam_engine.reshape]."""

from ..reshape import (
    fasterrcnn_reshape_transform,
    swinT_reshape_transform,
    vit_reshape_transform,
)

__all__ = [
    "fasterrcnn_reshape_transform",
    "swinT_reshape_transform",
    "vit_reshape_transform",
]
