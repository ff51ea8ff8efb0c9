"""Encoded images for the decoding tests: every allowed format, formats outside the allowlist, hostile headers."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: the formats a request may send by default (handlers.serving.codec.IMAGE_FORMATS), with save options that
#: keep the pixels exact where the format allows it
ALLOWED_SAVES = {"JPEG": {"quality": 90}, "PNG": {}, "WEBP": {"lossless": True}, "BMP": {}, "TIFF": {}, "GIF": {}}
#: formats Pillow writes but a request may not send (EPS would run Ghostscript to decode)
REFUSED_SAVES = {"EPS": {}, "TGA": {}, "PCX": {}, "PPM": {}, "SGI": {}, "ICO": {}, "JPEG2000": {}, "DDS": {},
                 "QOI": {}, "IM": {}, "AVIF": {}}  # fmt: skip


def photo(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth uint8 RGB ``[height, width, 3]`` picture with some texture (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 127 // max(height + width - 2, 1)], 2)
    return np.clip(base + rng.integers(-12, 13, (height, width, 3)), 0, 255).astype(np.uint8)


def save(array: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    picture = array if isinstance(array, Image.Image) else Image.fromarray(array)
    if fmt == "GIF" and picture.mode == "RGB":
        picture = picture.convert("P", palette=Image.Palette.ADAPTIVE)
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg_header_only(width: int, height: int, end: bool = True) -> bytes:
    """A JPEG with valid markers (tables, a frame of ``width`` x ``height``, a scan header) and no scan data:
    a few hundred bytes that claim ``width * height`` pixels. ``end``: close it with EOI."""
    data = save(np.zeros((16, 16, 3), np.uint8), "JPEG")
    frame = data.index(b"\xff\xc0")
    data = data[: frame + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[frame + 9 :]
    scan = data.index(b"\xff\xda")
    header_end = scan + 2 + int.from_bytes(data[scan + 2 : scan + 4], "big")
    return data[:header_end] + (b"\xff\xd9" if end else b"")


def frames(fmt: str, count: int = 2, **options) -> bytes:
    """A ``count``-frame image (animated GIF/WebP/PNG, multi-page TIFF, MPO) of distinct frames."""
    pictures = [Image.fromarray(photo(seed=i)) for i in range(count)]
    if fmt == "GIF":
        pictures = [p.convert("P", palette=Image.Palette.ADAPTIVE) for p in pictures]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format=fmt, save_all=True, append_images=pictures[1:], **options)
    return buffer.getvalue()
