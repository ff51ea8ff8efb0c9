"""Image helpers: pytorch-grad-cam's NumPy helpers, plus torch-native colour maps and overlays.

The torch-native functions (:func:`colorize`, :func:`overlay`, :func:`to_uint8`) keep work on the
tensor's device, so a server copies only the final uint8 image to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .functional import scale_per_image

__all__ = [
    "preprocess_image",
    "deprocess_image",
    "show_cam_on_image",
    "scale_cam_image",
    "jet",
    "colorize",
    "overlay",
    "to_uint8",
]


def preprocess_image(img: np.ndarray, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """``[H, W, 3]`` image (uint8, or float in [0, 1]) -> normalised ``[1, 3, H, W]`` float32 tensor."""
    array = np.asarray(img)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float()
    if array.dtype == np.uint8:
        tensor = tensor / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return ((tensor - mean_t) / std_t).unsqueeze(0)


def deprocess_image(img: np.ndarray) -> np.ndarray:
    """Standardise a gradient image for display: ``clip((x - mean) / (std + 1e-5) * 0.1 + 0.5) * 255``."""
    img = img - np.mean(img)
    img = img / (np.std(img) + 1e-5)
    img = img * 0.1 + 0.5
    return np.uint8(np.clip(img, 0, 1) * 255)


def jet(values: torch.Tensor) -> torch.Tensor:
    """The jet colour map: ``[...]`` values in [0, 1] -> float RGB ``[..., 3]`` in [0, 1]."""
    x = values.clamp(0, 1)[..., None]
    centres = torch.tensor([0.75, 0.5, 0.25], device=values.device, dtype=x.dtype)
    return (1.5 - (4 * x - 4 * centres).abs()).clamp(0, 1)


def to_uint8(cam: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 (rounded)."""
    return (cam.clamp(0, 1) * 255).round().to(torch.uint8)


def colorize(cam: torch.Tensor) -> torch.Tensor:
    """``[..., H, W]`` CAM in [0, 1] -> uint8 RGB ``[..., H, W, 3]`` with the jet colour map."""
    return to_uint8(jet(cam.float()))


def overlay(image: torch.Tensor, cam: torch.Tensor, image_weight: float = 0.5) -> torch.Tensor:
    """Blend a uint8 RGB image ``[H, W, 3]`` with a CAM ``[h, w]`` (resized to the image): uint8 RGB.

    ``image_weight * image + (1 - image_weight) * jet(cam)``, rescaled so its maximum is 255,
    as pytorch-grad-cam's ``show_cam_on_image`` does.
    """
    if not 0 <= image_weight <= 1:
        raise ValueError(f"image_weight must be in [0, 1], got {image_weight}")
    height, width = image.shape[:2]
    cam = cam.float()
    if tuple(cam.shape[-2:]) != (height, width):
        cam = F.interpolate(cam[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    picture = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    blended = (1 - image_weight) * jet(cam) + image_weight * picture
    return to_uint8(blended / blended.max().clamp_min(1e-7))


def show_cam_on_image(
    img: np.ndarray, mask: np.ndarray, use_rgb: bool = False, colormap=None, image_weight: float = 0.5
) -> np.ndarray:
    """Overlay ``mask`` ``[H, W]`` in [0, 1] on ``img`` ``[H, W, 3]`` float in [0, 1]; uint8 result.

    The colour map is jet; ``colormap`` may be a callable mapping ``[H, W]`` values to ``[H, W, 3]``
    RGB floats. The result is BGR unless ``use_rgb`` (pytorch-grad-cam's convention).
    """
    if np.max(img) > 1:
        raise ValueError("The input image should be np.float32 in the range [0, 1]")
    if not 0 <= image_weight <= 1:
        raise ValueError(f"image_weight should be in the range [0, 1], got {image_weight}")
    # Like the reference: the mask is quantised to 8 bits, then looked up in an 8-bit colour table.
    cam_t = torch.as_tensor(np.uint8(255 * np.asarray(mask, dtype=np.float32))).float() / 255
    heat = colormap(cam_t) if callable(colormap) else jet(cam_t)
    heat = (torch.as_tensor(np.asarray(heat, dtype=np.float32)) * 255).round() / 255
    if not use_rgb:
        heat = heat.flip(-1)
    cam = (1 - image_weight) * heat + image_weight * torch.as_tensor(np.asarray(img, dtype=np.float32))
    cam = cam / cam.max()
    return np.uint8(255 * cam.numpy())


def scale_cam_image(cam: np.ndarray, target_size: tuple[int, int] | None = None) -> np.ndarray:
    """Min-max scale each ``[h, w]`` map of a batch to [0, 1], then resize to ``target_size`` (W, H)."""
    tensor = scale_per_image(torch.as_tensor(np.asarray(cam, dtype=np.float32)))
    if target_size is not None:
        size = tuple(target_size[::-1])
        mode = "bilinear" if len(size) == 2 else "trilinear"
        tensor = F.interpolate(tensor[:, None], size=size, mode=mode, align_corners=False)[:, 0]
    return tensor.numpy().astype(np.float32)
