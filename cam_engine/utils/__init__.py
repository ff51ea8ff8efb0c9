"""pytorch-grad-cam's ``utils`` package paths (thin re-exports of cam_engine's modules)."""

from . import find_layers, image, model_targets, reshape_transforms, svd_on_activations

__all__ = ["find_layers", "image", "model_targets", "reshape_transforms", "svd_on_activations"]
