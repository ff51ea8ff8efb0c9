"""cam_engine: class activation maps for PyTorch models, fast and without side effects.

Drop-in for pytorch-grad-cam users::

    from cam_engine import GradCAM
    from cam_engine.targets import ClassifierOutputTarget
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        heatmaps = cam(input_tensor=x, targets=[ClassifierOutputTarget(281)])  # NumPy [B, H, W]

Torch-native entry used by servers: ``cam_engine.create("gradcam", model, ["layer4.-1"]).explain(x)``
returns a tensor on the model's device; ``cam_engine.methods()`` lists the registered names.
A server may cut the model at the target layer ([`cam_engine.split`][cam_engine.split]) and run the part before it on an
optimised copy (``cam.forward_split``); only the part after it then runs with autograd.
"""

from . import functional, image, reshape, split, targets
from .core import BaseCAM, CAMResult
from .layers import LayerNotFoundError, resolve_layer, resolve_layers
from .methods import (
    FEM,
    KPCA_CAM,
    EigenCAM,
    EigenGradCAM,
    FinerCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ShapleyCAM,
    XGradCAM,
)
from .registry import create, get_method, methods

# isort: split
# Registered after the single-pass methods, so that methods() lists those first.
from .perturbation import AblationCAM, ScoreCAM  # isort: skip
from .fullgrad import FullGrad  # isort: skip
from .baselines import RandomCAM  # isort: skip
from .guided_backprop import GuidedBackpropReLUModel  # isort: skip
from .methods import SegEigenCAM  # isort: skip
from .meta import SESS, RefineCAM  # isort: skip
from .activations_and_gradients import ActivationsAndGradients  # isort: skip
from .ablation_layer import AblationLayer, AblationLayerFasterRCNN, AblationLayerVit  # isort: skip
from .feature_factorization import DeepFeatureFactorization, run_dff_on_image  # isort: skip
from . import utils, metrics  # isort: skip  (grad-cam's package paths)

__all__ = [
    "AblationCAM",
    "AblationLayer",
    "AblationLayerFasterRCNN",
    "AblationLayerVit",
    "ActivationsAndGradients",
    "DeepFeatureFactorization",
    "RefineCAM",
    "SESS",
    "SegEigenCAM",
    "metrics",
    "run_dff_on_image",
    "utils",
    "BaseCAM",
    "CAMResult",
    "EigenCAM",
    "EigenGradCAM",
    "FEM",
    "FinerCAM",
    "FullGrad",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GuidedBackpropReLUModel",
    "HiResCAM",
    "KPCA_CAM",
    "LayerCAM",
    "LayerNotFoundError",
    "RandomCAM",
    "ScoreCAM",
    "ShapleyCAM",
    "XGradCAM",
    "create",
    "functional",
    "get_method",
    "image",
    "methods",
    "reshape",
    "split",
    "resolve_layer",
    "resolve_layers",
    "targets",
]
