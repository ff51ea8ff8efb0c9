"""Limits that keep one request from breaking its batch or its worker.

- **Response size.** TorchServe's frontend refuses a worker message whose response is longer than
  ``max_response_size`` (6,553,500 B by default) and restarts the worker, failing every request of the
  batch. The worker is told nothing about that limit, so :func:`max_response_size` reads it from the
  config the server runs with (:mod:`handlers.serving.frontend`): the frontend (this worker's parent process) is started as
  ``java ... org.pytorch.serve.ModelServer ... -f <config.properties>``; ``TS_MAX_RESPONSE_SIZE`` wins
  when the config enables ``enable_envvars_config``; the handler config key ``max_response_size``
  overrides both. An answer over the limit is replaced by a 4xx JSON error naming the limit.
- **Heatmap size.** :func:`capped_geometry` maps CAMs onto a grid of at most ``max_heatmap_pixels``
  pixels with the submitted image's aspect, so a 6000x6000 upload does not cost 36 Mpx float maps per
  target; the answer's ``width``/``height`` give the size, and ``scaled_from`` the image's own.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from handlers.serving.frontend import DEFAULT_MAX_RESPONSE_SIZE, frontend_config, max_response_size
from handlers.serving.preprocess import Geometry

__all__ = [
    "DEFAULT_MAX_RESPONSE_SIZE",
    "max_response_size",
    "frontend_config",
    "capped_geometry",
    "capped_image",
    "too_large",
]

logger = logging.getLogger(__name__)

def too_large(size: int, limit: int, source: str) -> tuple[int, str, str]:
    """``(code, type, message)`` for an answer of ``size`` bytes over ``limit``."""
    return (
        413,
        "ResponseTooLarge",
        f"the answer would be {size} bytes, over the server's response limit of {limit} bytes ({source}); "
        "ask for fewer targets, output 'heatmap' instead of 'both', fewer images per request or send a "
        "smaller image, or raise max_response_size in TorchServe's config.properties",
    )


def capped_size(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """The largest ``(h, w)`` with the aspect of ``(height, width)`` and ``h * w <= max_pixels``."""
    if height * width <= max_pixels:
        return height, width
    factor = math.sqrt(max_pixels / (height * width))
    return max(1, int(height * factor)), max(1, int(width * factor))


def capped_geometry(geometry: Geometry, max_pixels: int) -> Geometry:
    """``geometry`` seen from a coarser copy of the submitted image of at most ``max_pixels`` pixels.

    The same continuous map (resize, crop, padding), sampled at the coarser pixels' centres, so
    :func:`handlers.serving.preprocess.to_source` gives the heatmap directly at the capped size.
    """
    height, width = capped_size(*geometry.source_size, max_pixels)
    if (height, width) == tuple(geometry.source_size):
        return geometry
    # Geometry.scale is resized / source: keeping resized and offset, a smaller source is a coarser grid.
    return Geometry((height, width), geometry.resized_size, geometry.offset, geometry.input_size)


def capped_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[3, h, w]`` resized (antialiased) to ``size`` ``(h', w')``; unchanged when equal."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    x = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)
