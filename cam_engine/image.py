"""Image helpers: pytorch-grad-cam's NumPy helpers, plus torch-native colour maps and overlays.

The torch-native functions ([`colorize`][cam_engine.image.colorize], [`overlay`][cam_engine.image.overlay], [`to_uint8`][cam_engine.image.to_uint8]) keep work on the
tensor's device, so a server copies only the final uint8 image to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from .functional import resize_maps, scale_per_image

__all__ = [
    "preprocess_image",
    "deprocess_image",
    "show_cam_on_image",
    "scale_cam_image",
    "jet",
    "COLORMAPS",
    "colormap_id",
    "colormap_table",
    "colorize",
    "overlay",
    "to_uint8",
    "create_labels_legend",
    "show_factorization_on_image",
    "scale_accross_batch_and_channels",
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


#: OpenCV's colour maps by name (the ``cv2.COLORMAP_*`` ids, stable across OpenCV 4 releases).
COLORMAPS: dict[str, int] = {
    "autumn": 0, "bone": 1, "jet": 2, "winter": 3, "rainbow": 4, "ocean": 5, "summer": 6, "spring": 7,
    "cool": 8, "hsv": 9, "pink": 10, "hot": 11, "parula": 12, "magma": 13, "inferno": 14, "plasma": 15,
    "viridis": 16, "cividis": 17, "twilight": 18, "twilight_shifted": 19, "turbo": 20, "deepgreen": 21,
}


def colormap_id(colormap: str | int) -> int:
    """An OpenCV colour map name (``"viridis"``, case-insensitive) or id -> its ``cv2.COLORMAP_*`` id.

    Raises ``ValueError`` naming the allowed names.
    """
    if isinstance(colormap, (int, np.integer)) and not isinstance(colormap, bool):
        if int(colormap) in COLORMAPS.values():
            return int(colormap)
    elif isinstance(colormap, str) and colormap.lower() in COLORMAPS:
        return COLORMAPS[colormap.lower()]
    raise ValueError(f"colormap must be one of {', '.join(COLORMAPS)} (or its cv2.COLORMAP_* id), got {colormap!r}")


@cache
def _table(colormap: int) -> torch.Tensor:
    import cv2  # only for colour maps other than jet

    bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], colormap)[:, 0]
    return torch.from_numpy(np.ascontiguousarray(bgr[:, ::-1]))


def colormap_table(colormap: str | int, device: torch.device | str = "cpu") -> torch.Tensor:
    """OpenCV's 256-entry table for ``colormap`` (name or id) as uint8 RGB ``[256, 3]`` on ``device``."""
    return _table(colormap_id(colormap)).to(device)


def to_uint8(cam: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 (rounded)."""
    return cam.clamp(0, 1).mul_(255).round_().to(torch.uint8)  # clamp's copy is the only float temporary


def _colours(cam: torch.Tensor, colormap: str | int) -> torch.Tensor:
    """``[...]`` floats in [0, 1] -> float RGB ``[..., 3]`` in [0, 1]: jet computed, others OpenCV's table
    (looked up at the 8-bit quantised value, as ``cv2.applyColorMap`` does)."""
    if colormap_id(colormap) == COLORMAPS["jet"]:
        return jet(cam)
    table = colormap_table(colormap, cam.device)
    return table[to_uint8(cam).long()].float() / 255.0


def colorize(cam: torch.Tensor, colormap: str | int = "jet") -> torch.Tensor:
    """``[..., H, W]`` CAM in [0, 1] -> uint8 RGB ``[..., H, W, 3]`` with ``colormap`` (an OpenCV name or id)."""
    return to_uint8(_colours(cam.float(), colormap))


def overlay(
    image: torch.Tensor, cam: torch.Tensor, image_weight: float = 0.5, colormap: str | int = "jet"
) -> torch.Tensor:
    """Blend a uint8 RGB image ``[H, W, 3]`` with a CAM ``[h, w]`` (resized to the image): uint8 RGB.

    ``image_weight * image + (1 - image_weight) * colormap(cam)``, rescaled so its maximum is 255,
    as pytorch-grad-cam's ``show_cam_on_image`` does. ``colormap``: a name of `COLORMAPS`
    (``jet``, ``viridis``, ``inferno``, ``turbo``, ...) or its ``cv2.COLORMAP_*`` id.
    """
    if not 0 <= image_weight <= 1:
        raise ValueError(f"image_weight must be in [0, 1], got {image_weight}")
    height, width = image.shape[:2]
    cam = cam.float()
    if tuple(cam.shape[-2:]) != (height, width):
        cam = F.interpolate(cam[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    picture = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    blended = (1 - image_weight) * _colours(cam, colormap) + image_weight * picture
    return to_uint8(blended / blended.max().clamp_min(1e-7))


def show_cam_on_image(
    img: np.ndarray, mask: np.ndarray, use_rgb: bool = False, colormap=None, image_weight: float = 0.5
) -> np.ndarray:
    """Overlay ``mask`` ``[H, W]`` in [0, 1] on ``img`` ``[H, W, 3]`` float in [0, 1]; uint8 result.

    ``colormap``: an OpenCV colour map id (``cv2.COLORMAP_JET``, the default, ``cv2.COLORMAP_VIRIDIS``,
    ...) or its name (``"viridis"``, see `COLORMAPS`) looked up with ``cv2.applyColorMap`` as
    pytorch-grad-cam does, or a callable mapping ``[H, W]`` values to ``[H, W, 3]`` RGB floats in
    [0, 1]. The result is BGR unless ``use_rgb`` (grad-cam's convention).
    ``image_weight * img + (1 - image_weight) * heatmap``, divided by its maximum.
    """
    if isinstance(colormap, str):
        colormap = colormap_id(colormap)
    if np.max(img) > 1:
        raise ValueError("The input image should be np.float32 in the range [0, 1]")
    if not 0 <= image_weight <= 1:
        raise ValueError(f"image_weight should be in the range [0, 1], got {image_weight}")
    # Like the reference: the mask is quantised to 8 bits, then looked up in an 8-bit colour table.
    quantised = np.uint8(255 * np.asarray(mask, dtype=np.float32))
    if colormap is None or isinstance(colormap, (int, np.integer)):
        if colormap is None or int(colormap) == 2:  # cv2.COLORMAP_JET: the torch table, no OpenCV needed
            heat = (jet(torch.as_tensor(quantised).float() / 255) * 255).round() / 255
            heat = heat if use_rgb else heat.flip(-1)
        else:
            import cv2

            bgr = cv2.applyColorMap(quantised, int(colormap))
            heat = torch.as_tensor(np.float32(bgr[..., ::-1] if use_rgb else bgr) / 255)
    else:
        heat = torch.as_tensor(np.asarray(colormap(torch.as_tensor(quantised).float() / 255), dtype=np.float32))
        heat = (heat * 255).round() / 255
        heat = heat if use_rgb else heat.flip(-1)
    cam = (1 - image_weight) * heat + image_weight * torch.as_tensor(np.asarray(img, dtype=np.float32))
    cam = cam / cam.max()
    return np.uint8(255 * cam.numpy())


def create_labels_legend(concept_scores: np.ndarray, labels: dict[int, str], top_k: int = 2) -> list[str]:
    """Per concept (row of ``concept_scores`` ``[N, K]``), its ``top_k`` labels ``"name:score"``, one per line."""
    legends = []
    for scores in np.asarray(concept_scores):
        top = np.argsort(scores)[::-1][:top_k]
        legends.append("\n".join(f"{','.join(labels[c].split(',')[:3])}:{scores[c]:.2f}" for c in top))
    return legends


def show_factorization_on_image(img: np.ndarray, explanations: np.ndarray, colors: Sequence[np.ndarray] | None = None,
                                image_weight: float = 0.5, concept_labels: Sequence[str] | None = None) -> np.ndarray:
    """Colour each pixel of RGB ``img`` ``[H, W, 3]`` (floats in [0, 1]) by the component of
    ``explanations`` ``[N, H, W]`` that is largest there, brightness = its value (HSV V channel).

    ``colors``: RGB(A) per component in [0, 1] (default: matplotlib's ``gist_rainbow``). With
    ``concept_labels`` a legend (matplotlib) is drawn to the right. Returns uint8 RGB. Like the
    reference, the non-maximal entries of ``explanations`` are set to 0 in place.
    """
    import cv2

    count = explanations.shape[0]
    if colors is None:
        from matplotlib import colormaps

        cmap = colormaps["gist_rainbow"]
        colors = [np.array(cmap(i)) for i in np.arange(0, 1, 1.0 / count)]
    winner = explanations.argmax(axis=0)
    masks = []
    for i in range(count):
        mask = np.zeros((img.shape[0], img.shape[1], 3))
        mask[:, :, :] = colors[i][:3]
        explanation = explanations[i]
        explanation[winner != i] = 0
        hsv = cv2.cvtColor(np.uint8(mask * 255), cv2.COLOR_RGB2HSV)
        hsv[:, :, 2] = np.uint8(255 * explanation)
        masks.append(np.float32(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)) / 255)
    result = np.uint8((img * image_weight + np.sum(np.float32(masks), axis=0) * (1 - image_weight)) * 255)
    if concept_labels is None:
        return result
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D

    px = 1 / plt.rcParams["figure.dpi"]
    fig = plt.figure(figsize=(result.shape[1] * px, result.shape[0] * px))
    plt.rcParams["legend.fontsize"] = int(14 * result.shape[0] / 256 / max(1, count / 6))
    width = 5 * result.shape[0] / 256
    lines = [Line2D([0], [0], color=colors[i], lw=width) for i in range(count)]
    plt.legend(lines, concept_labels, mode="expand", fancybox=True, shadow=True)
    plt.tight_layout(pad=0, w_pad=0, h_pad=0)
    plt.axis("off")
    fig.canvas.draw()
    data = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig=fig)
    data = cv2.resize(data, (result.shape[1], result.shape[0]))
    return np.hstack((result, data))


def scale_cam_image(cam: np.ndarray, target_size: tuple[int, ...] | None = None) -> np.ndarray:
    """Min-max scale each map of a batch ``[B, *S]`` to [0, 1], then resize to ``target_size``
    (``(W, H)``, or ``(W, H, D)`` reversed axes for volumes: bilinear, or ``scipy.ndimage.zoom`` for
    volumes, as pytorch-grad-cam). float32 NumPy."""
    tensor = scale_per_image(torch.as_tensor(np.asarray(cam, dtype=np.float32)))
    if target_size is not None:
        tensor = resize_maps(tensor, tuple(target_size[::-1]))
    return tensor.numpy().astype(np.float32)


def scale_accross_batch_and_channels(tensor: np.ndarray, target_size: tuple[int, int]) -> np.ndarray:
    """[`scale_cam_image`][cam_engine.image.scale_cam_image] of every ``[h, w]`` map of ``[B, C, h, w]``: ``[B, C, H, W]``."""
    batch, channels = tensor.shape[:2]
    scaled = scale_cam_image(np.asarray(tensor).reshape(batch * channels, *tensor.shape[2:]), target_size)
    return scaled.reshape(batch, channels, target_size[1], target_size[0])
