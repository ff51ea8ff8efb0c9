"""How explanations leave the server: heatmap PNGs, overlay JPEGs, or raw float maps.

Request options (defaults from the model config, :class:`handlers.config.ExplanationConfig`):

- ``colormap``: an OpenCV colour map name for overlays (``jet``, ``viridis``, ``inferno``, ``turbo``, ...:
  :data:`cam_engine.image.COLORMAPS`); default ``overlay_colormap``.
- ``alpha``: the colour map's weight in an overlay, in [0, 1] (``alpha * colours + (1 - alpha) * image``,
  rescaled so its maximum is 255); default ``overlay_alpha``.
- ``heatmap_format``: ``png`` (8-bit grayscale of the [0, 1] map, the default), ``float16`` (the map's raw
  values as little-endian IEEE half floats, row-major) or ``npy`` (a NumPy ``.npy`` file of float32);
  raw answers carry ``dtype`` and ``shape`` ``[height, width]`` beside the base64 ``data``.
- ``heatmap_size``: ``image`` (the submitted photo's size, capped by ``max_heatmap_pixels``; the default)
  or ``input`` (the model's input grid, ``input_size``); raw formats only.

Raw values: for a CAM method, cam_engine's own map (float32, ReLU then min-max scaled to [0, 1] per
layer, bilinearly resized to the input grid, averaged over layers and scaled to [0, 1] again); for a
Captum method (:mod:`handlers.serving.attributions`), the signed attribution summed over colour channels.
Everything is bounded by the response-size limit (:mod:`handlers.serving.limits`).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cam_engine import image as cam_image
from handlers.serving import limits
from handlers.serving.codec import encode_jpeg, encode_png, encode_raw
from handlers.serving.errors import RequestError
from handlers.serving.options import option_names
from handlers.serving.preprocess import to_source
from handlers.settings import choice, setting, unit

__all__ = ["RENDER_OPTIONS", "HEATMAP_FORMATS", "HEATMAP_SIZES", "RenderOptions", "encode_explanations"]

HEATMAP_FORMATS = ("png", "float16", "npy")
HEATMAP_SIZES = ("image", "input")


@dataclass(frozen=True)
class RenderOptions:
    """One request's picture options (see the module docstring), read by :func:`handlers.serving.options.read_options`."""

    colormap: str = setting("jet", choice(*cam_image.COLORMAPS), default_from="overlay_colormap")
    alpha: float = setting(0.5, unit, default_from="overlay_alpha")
    heatmap_format: str = setting("png", choice(*HEATMAP_FORMATS))
    heatmap_size: str = setting("image", choice(*HEATMAP_SIZES))

    def __post_init__(self) -> None:
        if self.heatmap_format == "png" and self.heatmap_size != "image":
            raise RequestError("heatmap_size 'input' needs heatmap_format 'float16' or 'npy' (a PNG is the photo's size)")


RENDER_OPTIONS = option_names(RenderOptions)


Entry = tuple[int, str, tuple[int, ...], int]  # (target row, "heatmap"/"overlay", picture shape, piece index)


def _pictures(request: Any, request_cams: torch.Tensor, max_heatmap_pixels: int, pieces: list[torch.Tensor]) -> list[Entry]:
    """Append ``request``'s pictures (flat uint8 views, on the model's device) to ``pieces``; their layout.

    ``request_cams``: ``[T, h, w]`` in [0, 1]; mapped onto a grid of at most ``max_heatmap_pixels``."""
    entries: list[Entry] = []
    render = request.render or RenderOptions()
    geometry = limits.capped_geometry(request.geometry, max_heatmap_pixels)
    mapped = to_source(request_cams, geometry)
    raw = request.raw_cams if request.raw_cams is not None else request_cams
    if render.heatmap_format != "png" and "heatmap" in request.outputs:
        raw = (raw if render.heatmap_size == "input" else to_source(raw, geometry)).float()
    image = None
    if "overlay" in request.outputs:
        size = (int(mapped.shape[-2]), int(mapped.shape[-1]))
        image = limits.capped_image(request.image, size).to(mapped.device).permute(1, 2, 0)
    for target_row in range(mapped.shape[0]):
        if "heatmap" in request.outputs:
            picture = cam_image.to_uint8(mapped[target_row]) if render.heatmap_format == "png" else raw[target_row]
            entries.append((target_row, "heatmap", tuple(picture.shape), len(pieces)))
            pieces.append(picture.reshape(-1).contiguous().view(torch.uint8))
        if image is not None:
            picture = cam_image.overlay(image, mapped[target_row], 1 - render.alpha, render.colormap)
            entries.append((target_row, "overlay", tuple(picture.shape), len(pieces)))
            pieces.append(picture.reshape(-1))
    return entries


def _encode_one(
    request: Any, kind: str, shape: tuple[int, ...], chunk: np.ndarray, metrics: Any, quality: int
) -> dict[str, Any]:
    """One picture's answer entry (``format``, ``width``, ``height``, ``data`` ...) from its host bytes."""
    render = request.render or RenderOptions()
    extra: dict[str, Any] = {}
    if kind == "heatmap" and render.heatmap_format != "png":
        fmt = render.heatmap_format
        data, extra = metrics.encoded(fmt, encode_raw, chunk.view(np.float32).reshape(shape), fmt)
    elif kind == "heatmap":
        data, fmt = metrics.encoded("png", encode_png, chunk.reshape(shape)), "png"
    else:
        data, fmt = metrics.encoded("jpeg", encode_jpeg, chunk.reshape(shape), quality), "jpeg"
    entry = {"format": fmt, "width": int(shape[1]), "height": int(shape[0]), **extra}
    if kind == "heatmap" and render.heatmap_size == "input" and render.heatmap_format != "png":
        entry["grid"] = "input"
    elif tuple(shape[:2]) != tuple(request.image.shape[-2:]):  # capped by max_heatmap_pixels
        entry["scaled_from"] = {"width": int(request.image.shape[-1]), "height": int(request.image.shape[-2])}
    return {**entry, "data": base64.b64encode(data).decode("ascii")}


def encode_explanations(
    requests: list[Any], cams: list[torch.Tensor | None], metrics: Any, max_heatmap_pixels: int, quality: int
) -> list[list[dict[str, Any]] | None]:
    """Per request, its heatmaps/overlays (or raw maps) mapped onto the submitted image and encoded
    (``metrics.encoded`` times each encode and counts its bytes; overlays are JPEGs of ``quality``).

    ``cams[i]``: request i's maps ``[T, H, W]`` in [0, 1] at the input grid (None: not explained); a
    request's ``raw_cams`` (same shape, raw values) feed the ``float16``/``npy`` formats. All pictures of
    the batch are built on the model's device and copied to the host once.
    """
    pieces: list[torch.Tensor] = []
    layout: list[list[Entry]] = []
    for request, request_cams in zip(requests, cams):
        explained = request_cams is not None and request.explain  # h * w <= max_heatmap_pixels
        layout.append(_pictures(request, request_cams, max_heatmap_pixels, pieces) if request_cams is not None and explained else [])
    host = torch.cat(pieces).cpu().numpy() if pieces else np.zeros(0, np.uint8)  # the one copy (bytes)
    offsets = np.cumsum([0] + [p.numel() for p in pieces])
    encoded: list[list[dict[str, Any]] | None] = []
    for request, entries in zip(requests, layout):
        if not request.explain:
            encoded.append(None)
            continue
        per_target: dict[int, dict[str, Any]] = {}
        for target_row, kind, shape, piece in entries:
            chunk = host[offsets[piece] : offsets[piece + 1]]
            per_target.setdefault(target_row, {})[kind] = _encode_one(request, kind, shape, chunk, metrics, quality)
        encoded.append([per_target[row] for row in sorted(per_target)])
    return encoded
