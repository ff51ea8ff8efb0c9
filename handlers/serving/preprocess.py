"""Image -> model input, and the exact inverse that maps a CAM back onto the submitted image.

Every supported transform (stretch, letterbox, shorter-side resize, centre crop) is an axis-aligned
scale and shift. In continuous pixel-edge coordinates (pixel ``i`` spans ``[i, i + 1)``) a point ``y``
of the submitted image lands at ``u = y * scale + offset`` in the model input. :class:`Geometry`
records that map; :func:`to_source` samples a model-input-sized CAM at every submitted pixel's centre
through it (bilinear, half-pixel centres, edge-clamped inside the model's view, zero outside it), as
two small interpolation matrices: ``heatmap = Ry @ cam @ Rx^T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from handlers.config import PreprocessingConfig

__all__ = ["Geometry", "plan", "preprocess", "inverse_matrix", "to_source"]


@dataclass(frozen=True)
class Geometry:
    """Where a submitted image of ``source_size`` sits in the model input of ``input_size``.

    All sizes are ``(height, width)``. The image is resized to ``resized_size`` and its top-left
    corner placed at ``offset`` (negative when cropped, positive when padded).
    """

    source_size: tuple[int, int]
    resized_size: tuple[int, int]
    offset: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """``(sy, sx)``: model-input pixels per submitted pixel along each axis."""
        return (
            self.resized_size[0] / self.source_size[0],
            self.resized_size[1] / self.source_size[1],
        )


def plan(source_size: tuple[int, int], config: PreprocessingConfig) -> Geometry:
    """The geometry ``config`` gives a submitted image of ``source_size`` ``(height, width)``."""
    height, width = source_size
    target = config.resize_size or config.input_size
    if config.resize == "stretch":
        resized = target
    elif config.resize == "letterbox":
        factor = min(target[0] / height, target[1] / width)
        resized = (max(1, round(height * factor)), max(1, round(width * factor)))
    else:  # shorter_side
        factor = min(target) / min(height, width)
        resized = (max(1, round(height * factor)), max(1, round(width * factor)))
    offset = tuple(_placement(r, n) for r, n in zip(resized, config.input_size))
    return Geometry((height, width), (int(resized[0]), int(resized[1])), offset, config.input_size)  # type: ignore[arg-type]


def _placement(resized: int, canvas: int) -> int:
    if resized >= canvas:  # centre crop, torchvision's rounding
        return -int(round((resized - canvas) / 2.0))
    return (canvas - resized) // 2  # centred padding


def preprocess(image: torch.Tensor, config: PreprocessingConfig) -> tuple[torch.Tensor, Geometry]:
    """uint8 RGB ``[3, h, w]`` -> normalised float32 ``[3, H, W]`` and its :class:`Geometry`."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, h, w], got shape {tuple(image.shape)}")
    geometry = plan((int(image.shape[1]), int(image.shape[2])), config)
    x = image.unsqueeze(0).float().div_(255.0)
    if geometry.resized_size != geometry.source_size:
        mode = config.interpolation
        kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
        x = F.interpolate(x, size=geometry.resized_size, mode=mode, **kwargs)
        if mode == "bicubic":
            x = x.clamp_(0, 1)
    height, width = config.input_size
    canvas = torch.tensor(config.fill, dtype=x.dtype, device=x.device)[None, :, None, None].expand(1, 3, height, width)
    canvas = canvas.clone()
    (top, left), (rh, rw) = geometry.offset, geometry.resized_size
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + rh, height), min(left + rw, width)
    canvas[:, :, y0:y1, x0:x1] = x[:, :, y0 - top : y1 - top, x0 - left : x1 - left]
    mean = torch.tensor(config.mean, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(config.std, dtype=x.dtype, device=x.device)[:, None, None]
    return (canvas[0] - mean) / std, geometry


def inverse_matrix(
    n_source: int, n_input: int, scale: float, offset: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bilinear sampling weights ``[n_source, n_input]`` along one axis.

    Row ``i`` samples the model-input signal at ``u = (i + 0.5) * scale + offset`` (half-pixel
    centres, clamped to the edge pixels inside ``[0, n_input]``); rows whose ``u`` falls outside the
    model input are zero: the model never saw those pixels.
    """
    centres = (torch.arange(n_source, device=device, dtype=torch.float32) + 0.5) * scale + offset
    inside = (centres >= 0) & (centres <= n_input)
    position = (centres - 0.5).clamp(0, n_input - 1)
    low = position.floor().long().clamp(max=n_input - 1)
    high = (low + 1).clamp(max=n_input - 1)
    frac = position - low.float()
    weights = torch.zeros(n_source, n_input, device=device, dtype=torch.float32)
    rows = torch.arange(n_source, device=device)
    weights.index_put_((rows, low), (1 - frac) * inside, accumulate=True)
    weights.index_put_((rows, high), frac * inside, accumulate=True)
    return weights


def to_source(cams: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Map model-input CAMs ``[R, H, W]`` onto the submitted image: ``[R, h, w]``, same device.

    The exact inverse of :func:`preprocess`'s resize, crop and padding; zero outside a crop.
    """
    if tuple(cams.shape[-2:]) != tuple(geometry.input_size):
        raise ValueError(f"CAMs of size {tuple(cams.shape[-2:])} do not match input size {geometry.input_size}")
    if geometry.offset == (0, 0) and tuple(geometry.resized_size) == tuple(geometry.input_size):
        if tuple(geometry.source_size) == tuple(geometry.input_size):
            return cams.float()  # nothing was resized: the CAM is already on the submitted pixels
        # A plain stretch: the same half-pixel-centre, edge-clamped bilinear sampling as the matrices
        # below, as one interpolation (several times cheaper than two matrix products).
        return F.interpolate(cams.float()[None], size=geometry.source_size, mode="bilinear", align_corners=False)[0]
    sy, sx = geometry.scale
    rows = inverse_matrix(geometry.source_size[0], geometry.input_size[0], sy, geometry.offset[0], cams.device)
    cols = inverse_matrix(geometry.source_size[1], geometry.input_size[1], sx, geometry.offset[1], cams.device)
    return rows @ cams.float() @ cols.T
