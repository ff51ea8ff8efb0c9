"""The CAM methods that need one forward pass (and, for gradient methods, one truncated backward).

Each class overrides one function, [`cam_image`][cam_engine.core.BaseCAM.cam_image], with the maths from
[`cam_engine.functional`][cam_engine.functional]; the engine does the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import functional as CF
from .core import BaseCAM, CAMResult
from .extension import to_numpy, to_tensor
from .model_utils import model_scores
from .registry import register
from .targets import FinerWeightedTarget

__all__ = [
    "GradCAM",
    "HiResCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "GradCAMElementWise",
    "EigenCAM",
    "EigenGradCAM",
    "KPCA_CAM",
    "FEM",
    "ShapleyCAM",
    "FinerCAM",
    "SegEigenCAM",
]


def _weights(function, activations, grads):
    """grad-cam's ``get_cam_weights`` contract: NumPy ``[B, C]`` from arrays or tensors ``[B, C, *S]``."""
    return to_numpy(function(to_tensor(activations), to_tensor(grads)))


@register("gradcam")
class GradCAM(BaseCAM):
    """Grad-CAM: ``relu(sum_c mean_s(dy/dA_c) A_c)`` (Selvaraju et al., ICCV 2017)."""

    def cam_image(self, activations, gradients, eigen_smooth):
        return CF.weighted_sum(CF.gradcam_weights(activations, gradients), activations, eigen_smooth)

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        return _weights(CF.gradcam_weights, activations, grads)


@register("hirescam")
class HiResCAM(BaseCAM):
    """HiResCAM: ``relu(sum_c dy/dA_c * A_c)``, element-wise, faithful to the model's computation."""

    def cam_image(self, activations, gradients, eigen_smooth):
        return CF.hirescam(activations, gradients, eigen_smooth)


@register("gradcam++")
class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++: channel weights from positive gradients weighted by higher-order terms."""

    def cam_image(self, activations, gradients, eigen_smooth):
        return CF.weighted_sum(CF.gradcam_plusplus_weights(activations, gradients), activations, eigen_smooth)

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        return _weights(CF.gradcam_plusplus_weights, activations, grads)


@register("xgradcam")
class XGradCAM(BaseCAM):
    """XGrad-CAM: channel weights ``sum_s G A / sum_s A`` (axiom-based)."""

    def cam_image(self, activations, gradients, eigen_smooth):
        return CF.weighted_sum(CF.xgradcam_weights(activations, gradients), activations, eigen_smooth)

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        return _weights(CF.xgradcam_weights, activations, grads)


@register("layercam")
class LayerCAM(BaseCAM):
    """LayerCAM: ``relu(sum_c relu(dy/dA_c) * A_c)``; works at shallow layers too."""

    def cam_image(self, activations, gradients, eigen_smooth):
        return CF.layercam(activations, gradients, eigen_smooth)


@register("gradcam_elementwise")
class GradCAMElementWise(BaseCAM):
    """Element-wise Grad-CAM: ``relu(sum_c relu(dy/dA_c * A_c))``."""

    def cam_image(self, activations, gradients, eigen_smooth):
        return CF.gradcam_elementwise(activations, gradients, eigen_smooth)


@register("eigencam")
class EigenCAM(BaseCAM):
    """EigenCAM: the activations' first principal component. Gradient-free and class-agnostic."""

    uses_gradients = False

    def cam_image(self, activations, gradients, eigen_smooth):
        return CF.eigencam(activations)


@register("eigengradcam")
class EigenGradCAM(BaseCAM):
    """EigenGradCAM: first principal component of ``gradients * activations``."""

    def cam_image(self, activations, gradients, eigen_smooth):
        return CF.eigengradcam(activations, gradients)


@register("kpca_cam")
class KPCA_CAM(BaseCAM):
    """KPCA-CAM: first kernel-PCA component of the activations (default: sigmoid kernel)."""

    uses_gradients = False

    def __init__(self, model, target_layers, reshape_transform=None, kernel: str = "sigmoid", gamma=None):
        super().__init__(model, target_layers, reshape_transform)
        self.kernel = kernel
        self.gamma = gamma

    def cam_image(self, activations, gradients, eigen_smooth):
        return CF.kernel_project_2d(activations, self.kernel, self.gamma)


@register("fem")
class FEM(BaseCAM):
    """Feature Explanation Method: channels weighted by their share of ``k``-sigma outliers."""

    uses_gradients = False

    def __init__(self, model, target_layers, reshape_transform=None, k: float = 2):
        super().__init__(model, target_layers, reshape_transform)
        self.k = k

    def cam_image(self, activations, gradients, eigen_smooth):
        return CF.fem(activations, self.k)


@register("shapleycam")
class ShapleyCAM(BaseCAM):
    """ShapleyCAM (arXiv:2501.06261): Grad-CAM weights from ``g - 1/2 H A``.

    ``g = dy/dA`` and ``H A`` is the Hessian-vector product of the score with respect to the
    activations along the activations themselves, both taken at the target layer only (the
    gradient graph is kept for the second derivative, never the parameters').
    """

    batch_target_gradients = False  # the Hessian-vector product needs one graph per target

    def forward_context(self):
        # Fused attention kernels have no second derivative: use the math kernel for this method.
        return sdpa_kernel([SDPBackend.MATH])

    def target_gradients(self, loss, tensors, retain_graph):
        grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
        out = []
        for tensor, grad in zip(tensors, grads):
            if grad is None:
                out.append(torch.zeros_like(tensor))
                continue
            hvp = None
            if grad.requires_grad:
                (hvp,) = torch.autograd.grad(grad, tensor, grad_outputs=tensor.detach(), retain_graph=True, allow_unused=True)
            out.append((grad - 0.5 * hvp).detach() if hvp is not None else grad.detach())
        return out

    def cam_image(self, activations, gradients, eigen_smooth):
        return CF.weighted_sum(CF.gradcam_weights(activations, gradients), activations, eigen_smooth)


@register("finercam")
class FinerCAM(BaseCAM):
    """Finer-CAM (arXiv:2501.11309): explain what separates a class from its closest rivals.

    With ``targets=None`` each image's target is a [`FinerWeightedTarget`][cam_engine.methods.FinerWeightedTarget] comparing its top
    class (or ``target_idx``) with the classes whose scores are nearest to it (``comparison_categories``
    are ranks in that order, 1..3 by default). The CAM itself comes from ``base_method``.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layers,
        reshape_transform: Callable | None = None,
        base_method: type[BaseCAM] = GradCAM,
    ):
        super().__init__(model, target_layers, reshape_transform)
        self.base_cam = base_method(model, self.target_layers, reshape_transform)
        self.uses_gradients = self.base_cam.uses_gradients
        self.alpha = 1.0
        self.comparison_categories: Sequence[int] | None = None
        self.target_idx: int | None = None

    def cam_image(self, activations, gradients, eigen_smooth):
        return self.base_cam.cam_image(activations, gradients, eigen_smooth)

    def target_gradients(self, loss, tensors, retain_graph):
        return self.base_cam.target_gradients(loss, tensors, retain_graph)

    def batched_target_gradients(self, losses, tensors):
        return self.base_cam.batched_target_gradients(losses, tensors)

    def resolve_targets(self, outputs: Any, targets, batch: int):
        if targets is not None:
            return targets
        scores = model_scores(outputs).detach().float()
        num_classes = scores.shape[-1]
        if self.comparison_categories is None:
            ranks = [1, 2, 3][: max(num_classes - 1, 0)]
        else:
            ranks = [c for c in self.comparison_categories if c < num_classes]
        main = scores.max(dim=-1).values if self.target_idx is None else scores[:, self.target_idx]
        # argsort of |score - main|; stable so that ties keep class order, as NumPy's quicksort mostly does
        order = torch.argsort((scores - main[:, None]).abs(), dim=-1, stable=True)
        return [
            [FinerWeightedTarget(int(order[i, 0]), [int(order[i, r]) for r in ranks], self.alpha)]
            for i in range(batch)
        ]

    def __call__(self, input_tensor, targets=None, eigen_smooth: bool = False, alpha: float = 1,
                 comparison_categories: Sequence[int] | None = None, target_idx: int | None = None,
                 aug_smooth: bool = False):
        """grad-cam's ``FinerCAM.__call__``: ``(input_tensor, targets, eigen_smooth, alpha, ...)``;
        ``aug_smooth`` (keyword only) is an addition. NumPy ``[B, H, W]``."""
        self.alpha, self.comparison_categories, self.target_idx = alpha, comparison_categories, target_idx
        return super().__call__(input_tensor, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)

    def forward(self, input_tensor, targets=None, eigen_smooth=False, alpha: float = 1,
                comparison_categories=None, target_idx=None):
        """pytorch-grad-cam's FinerCAM.forward signature."""
        return self(input_tensor, targets, eigen_smooth, alpha, comparison_categories, target_idx)

    def run(self, input_tensor, targets=None, aug_smooth=False, eigen_smooth=False) -> CAMResult:
        return super().run(input_tensor, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)


class SegEigenCAM(BaseCAM):
    """Seg-Eigen-CAM (Chung & Ying, Appl. Sci. 2025, 15(13), 7562): first principal component of
    ``|G| * A`` (gradient-weighted activations, eq. 10) with the sign chosen so that the largest
    magnitude is positive (eq. 13). ``eigen_smooth`` changes nothing (the CAM already is a projection).
    """

    def cam_image(self, activations, gradients, eigen_smooth):
        return CF.project_2d(gradients.abs() * activations)
