"""pytorch-grad-cam's module path ``score_cam``: re-exports [`cam_engine.perturbation`][cam_engine.perturbation]."""

from .perturbation import ScoreCAM

__all__ = ["ScoreCAM"]
