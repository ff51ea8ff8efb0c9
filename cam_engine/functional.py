"""The CAM mathematics as pure tensor functions.

Conventions: ``activations`` (A) and ``gradients`` (G) are float32 tensors ``[B, C, *S]`` where ``S``
is the spatial shape (``(h, w)`` for images, ``(d, h, w)`` for volumes). Channel-weight functions
return ``[B, C]``; CAM functions return ``[B, *S]`` *before* the ReLU and normalisation that the
engine applies. Nothing here touches NumPy, hooks or the model.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "spatial_dims",
    "weighted_sum",
    "project_2d",
    "kernel_project_2d",
    "gradcam_weights",
    "gradcam_plusplus_weights",
    "xgradcam_weights",
    "hirescam",
    "layercam",
    "gradcam_elementwise",
    "eigencam",
    "eigengradcam",
    "fem",
    "scale_per_image",
    "resize_maps",
    "VOLUME_RESIZES",
]

#: How volumetric (3-D) maps are resized: ``"zoom"`` is ``scipy.ndimage.zoom`` (cubic spline, on the
#: host), as pytorch-grad-cam does; ``"trilinear"`` stays on the device (half-pixel centres).
VOLUME_RESIZES = ("zoom", "trilinear")


def spatial_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The spatial axes of a ``[B, C, *S]`` tensor."""
    return tuple(range(2, x.ndim))


def _expand(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return weights.reshape(weights.shape + (1,) * (like.ndim - weights.ndim))


def project_2d(x: torch.Tensor) -> torch.Tensor:
    """Projection of each image's ``[C, *S]`` map on its first principal component: ``[B, *S]``.

    Per image, the ``N x C`` matrix ``M`` of spatial positions by channels is centred over the
    positions and projected on its first right singular vector: ``M v_1 = s_1 u_1``. NaNs count as 0.
    A thin SVD of ``M`` costs ``O(N C min(N, C))``, against the full ``C x C`` basis the reference forms.
    The sign is chosen so that the largest-magnitude entry is positive, where the reference leaves
    it to the SVD routine.
    """
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    batch, channels = x.shape[:2]
    m = x.reshape(batch, channels, -1).transpose(1, 2)
    m = m - m.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    projection = (m @ vh[:, 0, :, None])[..., 0]
    # The SVD's sign is arbitrary; fix it so that the largest-magnitude position is positive
    # (the sign correction of Seg-Eigen-CAM, eq. 13): deterministic and comparable across runs.
    extreme = projection.gather(1, projection.abs().argmax(dim=1, keepdim=True))
    projection = torch.where(extreme < 0, -projection, projection)
    return projection.reshape(batch, *x.shape[2:])


def _kernel(m: torch.Tensor, kernel: str, gamma: float | None, degree: int = 3, coef0: float = 1.0):
    n_features = m.shape[-1]
    gamma = 1.0 / n_features if gamma is None else gamma
    dot = m @ m.transpose(1, 2)
    if kernel == "sigmoid":
        return torch.tanh(gamma * dot + coef0)
    if kernel == "rbf":
        sq = (m * m).sum(-1)
        dist = (sq[:, :, None] + sq[:, None, :] - 2 * dot).clamp_min(0)
        return torch.exp(-gamma * dist)
    if kernel == "poly":
        return (gamma * dot + coef0) ** degree
    if kernel == "linear":
        return dot
    if kernel == "cosine":
        norm = m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = m / norm
        return unit @ unit.transpose(1, 2)
    raise ValueError(f"unknown kernel {kernel!r}: use sigmoid, rbf, poly, linear or cosine")


def kernel_project_2d(x: torch.Tensor, kernel: str = "sigmoid", gamma: float | None = None) -> torch.Tensor:
    """First kernel-PCA component of each image's centred ``N x C`` position-by-channel matrix.

    Same definition as scikit-learn's ``KernelPCA(n_components=1)``: centre the kernel matrix,
    take its top eigenpair ``(lambda, v)``, return ``v * sqrt(lambda)`` with the sign chosen so that
    the largest-magnitude entry of ``v`` is positive. Computed in float64 for a stable eigensolve.
    """
    x = torch.nan_to_num(x.double(), nan=0.0)
    batch, channels = x.shape[:2]
    m = x.reshape(batch, channels, -1).transpose(1, 2)
    m = m - m.mean(dim=1, keepdim=True)
    k = _kernel(m, kernel, gamma)
    k = k - k.mean(dim=1, keepdim=True) - k.mean(dim=2, keepdim=True) + k.mean(dim=(1, 2), keepdim=True)
    eigenvalues, eigenvectors = torch.linalg.eigh(k)
    top = eigenvectors[:, :, -1]
    sign = torch.sign(top.gather(1, top.abs().argmax(dim=1, keepdim=True)))
    projection = top * sign * eigenvalues[:, -1:].clamp_min(0).sqrt()
    return projection.float().reshape(batch, *x.shape[2:])


def weighted_sum(weights: torch.Tensor, activations: torch.Tensor, eigen_smooth: bool = False) -> torch.Tensor:
    """``sum_c w_c A_c`` (or the first principal component of ``w_c A_c`` with eigen_smooth)."""
    weighted = _expand(weights, activations) * activations
    return project_2d(weighted) if eigen_smooth else weighted.sum(dim=1)


def _reduce(elementwise: torch.Tensor, eigen_smooth: bool) -> torch.Tensor:
    return project_2d(elementwise) if eigen_smooth else elementwise.sum(dim=1)


def gradcam_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: ``w_c = mean_s G_c(s)``."""
    return gradients.mean(dim=spatial_dims(gradients))


def gradcam_plusplus_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19) with the exponential-output simplification:

    ``alpha_c(s) = G^2 / (2 G^2 + sum_s' A_c(s') G^3 + eps)`` (0 where ``G = 0``),
    ``w_c = sum_s alpha_c(s) relu(G_c(s))``, ``eps = 1e-6``.
    """
    dims = spatial_dims(gradients)
    grads_2 = gradients.pow(2)
    grads_3 = grads_2 * gradients
    sum_activations = activations.sum(dim=dims, keepdim=True)
    alpha = grads_2 / (2 * grads_2 + sum_activations * grads_3 + 1e-6)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    return (gradients.clamp_min(0) * alpha).sum(dim=dims)


def xgradcam_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020): ``w_c = sum_s G_c(s) A_c(s) / (sum_s A_c(s) + 1e-7)``."""
    dims = spatial_dims(gradients)
    sum_activations = activations.sum(dim=dims, keepdim=True)
    return (gradients * activations / (sum_activations + 1e-7)).sum(dim=dims)


def hirescam(activations: torch.Tensor, gradients: torch.Tensor, eigen_smooth: bool = False) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020): ``sum_c G_c(s) A_c(s)``."""
    return _reduce(gradients * activations, eigen_smooth)


def layercam(activations: torch.Tensor, gradients: torch.Tensor, eigen_smooth: bool = False) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): ``sum_c relu(G_c(s)) A_c(s)``."""
    return _reduce(gradients.clamp_min(0) * activations, eigen_smooth)


def gradcam_elementwise(
    activations: torch.Tensor, gradients: torch.Tensor, eigen_smooth: bool = False
) -> torch.Tensor:
    """Element-wise Grad-CAM: ``sum_c relu(G_c(s) A_c(s))``."""
    return _reduce((gradients * activations).clamp_min(0), eigen_smooth)


def eigencam(activations: torch.Tensor) -> torch.Tensor:
    """EigenCAM (Muhammad & Yeasin 2020): first principal component of the activations."""
    return project_2d(activations)


def eigengradcam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """EigenGradCAM: first principal component of ``G * A``."""
    return project_2d(gradients * activations)


def fem(activations: torch.Tensor, k: float = 2.0) -> torch.Tensor:
    """Feature Explanation Method (Fuad et al. 2020).

    Per channel, the share of positions above ``mean + k * std`` (population std) weighs the channel:
    ``w_c = mean_s [A_c(s) > mu_c + k sigma_c]``; ``cam = sum_c w_c A_c``.
    """
    dims = spatial_dims(activations)
    means = activations.mean(dim=dims, keepdim=True)
    stds = activations.std(dim=dims, keepdim=True, correction=0)
    weights = (activations > means + k * stds).float().mean(dim=dims, keepdim=True)
    return (weights * activations).sum(dim=1)


def scale_per_image(cam: torch.Tensor) -> torch.Tensor:
    """Min-max scale each image of ``[B, *S]`` to [0, 1]: ``(x - min) / (max(x - min) + 1e-7)``."""
    flat = cam.reshape(cam.shape[0], -1)
    flat = flat - flat.amin(dim=1, keepdim=True)  # a new tensor: the division below may work in place
    return flat.div_(flat.amax(dim=1, keepdim=True) + 1e-7).reshape(cam.shape)


def resize_maps(maps: torch.Tensor, size: tuple[int, ...], volume: str = "zoom") -> torch.Tensor:
    """Resize ``[B, *S]`` maps to ``[B, *size]``.

    1-D and 2-D maps: (bi)linear interpolation with half-pixel centres (OpenCV's ``INTER_LINEAR``,
    as pytorch-grad-cam resizes). 3-D maps: ``volume="zoom"`` uses ``scipy.ndimage.zoom`` (cubic
    spline, ``order=3``, per map on the host) like pytorch-grad-cam; ``"trilinear"`` interpolates on
    the maps' device instead.
    """
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    if len(size) == 3 and volume == "zoom":
        from scipy.ndimage import zoom

        host = maps.detach().float().cpu().numpy()
        factors = [t / s for s, t in zip(host.shape[1:], size)]
        zoomed = [zoom(volume_map, factors) for volume_map in host]
        return torch.from_numpy(np.stack(zoomed)).to(maps.device)
    if len(size) == 3 and volume != "trilinear":
        raise ValueError(f"volume resize must be one of {VOLUME_RESIZES}, got {volume!r}")
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return torch.nn.functional.interpolate(maps[:, None], size=size, mode=mode, align_corners=False)[:, 0]
