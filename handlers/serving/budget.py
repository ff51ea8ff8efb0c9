"""Pixel budgets: how many pixels one request, and one batch, may ask the worker to decode.

``max_image_pixels`` bounds one image, but a KServe request carries up to 32 of them and a batch several
requests: 16 JPEG headers of a few hundred bytes each claiming 6300x6300 would make the worker decode 635
million pixels (gigabytes). Before any image of the batch is decoded, :func:`refusals` reads every image's
header (:func:`handlers.serving.codec.image_pixels`; nothing is decoded) and adds up what each request claims:

- a request whose images claim more than ``max_request_pixels`` is refused whole: 413 ``TooManyPixels``;
- requests are admitted in batch order while the batch total stays within ``max_batch_pixels``; a request
  that would push it over gets 429 ``BatchPixelBudget`` (retry it: alone, or in a quieter batch, it fits).

An image over ``max_image_pixels``, or one that is not an image, counts for nothing here: it is refused on
its own when decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from handlers.serving import protocols
from handlers.serving.codec import image_pixels
from handlers.serving.errors import RequestError

if TYPE_CHECKING:
    from handlers.config import HandlerConfig

__all__ = ["refusals"]


def refusals(units: Sequence[protocols.Unit], config: HandlerConfig) -> dict[int, RequestError]:
    """Unit position -> its error, for every unit of a request the pixel budgets refuse (see the module doc)."""
    claims: dict[int, list[tuple[int, int]]] = {}  # request -> [(unit position, pixels)]
    for position, unit in enumerate(units):
        if "error" in unit.item:
            continue
        try:
            raw, _ = protocols.split_body(unit.item)
        except RequestError:
            continue  # answered with that error when the unit is parsed
        pixels = image_pixels(raw, config.image_formats)
        claims.setdefault(unit.request, []).append((position, pixels if pixels <= config.max_image_pixels else 0))
    refused: dict[int, RequestError] = {}
    admitted = 0
    for members in claims.values():
        total = sum(pixels for _, pixels in members)
        if total > config.max_request_pixels:
            error = RequestError(
                f"the {len(members)} image(s) of this request claim {total} pixels in their headers, over this "
                f"model's max_request_pixels of {config.max_request_pixels}: send fewer or smaller images",
                413,
                "TooManyPixels",
            )
        elif admitted + total > config.max_batch_pixels:
            error = RequestError(
                f"this request's {total} pixels do not fit the batch's remaining pixel budget ({config.max_batch_pixels}"
                f" - {admitted} already admitted, max_batch_pixels): retry it",
                429,
                "BatchPixelBudget",
            )
        else:
            admitted += total
            continue
        refused.update((position, error) for position, _ in members)
    return refused
