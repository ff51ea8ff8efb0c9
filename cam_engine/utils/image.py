"""pytorch-grad-cam's module path ``utils.image``: re-exports [`cam_engine.image`][cam_engine.image]."""

from ..image import (
    create_labels_legend,
    deprocess_image,
    preprocess_image,
    scale_accross_batch_and_channels,
    scale_cam_image,
    show_cam_on_image,
    show_factorization_on_image,
)

__all__ = [
    "create_labels_legend",
    "deprocess_image",
    "preprocess_image",
    "scale_accross_batch_and_channels",
    "scale_cam_image",
    "show_cam_on_image",
    "show_factorization_on_image",
]
