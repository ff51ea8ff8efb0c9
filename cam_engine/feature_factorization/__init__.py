"""Deep Feature Factorization (pytorch-grad-cam's ``feature_factorization`` package path)."""

from .deep_feature_factorization import DeepFeatureFactorization, dff, run_dff_on_image

__all__ = ["DeepFeatureFactorization", "dff", "run_dff_on_image"]
