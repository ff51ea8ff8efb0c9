"""pytorch-grad-cam's module path ``ablation_cam``: re-exports [`cam_engine.perturbation`][cam_engine.perturbation]."""

from .perturbation import AblationCAM

__all__ = ["AblationCAM"]
