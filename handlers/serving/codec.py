"""Image bytes in and out of the request path: decoding a submitted image, encoding heatmaps and overlays.

Decoding reads the header first and refuses decompression bombs before any pixel is decoded; a decoded
image is copied once (PIL's buffer into NumPy). Heatmaps are 8-bit grayscale PNGs, overlays JPEGs; raw
maps (:func:`encode_raw`) are little-endian float16 bytes or a NumPy ``.npy`` file.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
import zlib
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from handlers.serving.errors import RequestError

__all__ = ["decode_base64", "decode_image", "encode_png", "encode_jpeg", "encode_raw", "RAW_FORMATS"]

RAW_FORMATS = ("float16", "npy")


def decode_image(raw: bytes | bytearray, max_image_pixels: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 RGB ``[3, h, w]`` (EXIF orientation applied; a view of ``[h, w, 3]``).

    The pixel count is read from the header and checked against ``max_image_pixels`` before any pixel
    is decoded, so a 30000x30000 PNG of a few KB costs nothing. Raises :class:`RequestError`.
    """
    if not raw:
        raise RequestError("empty body: send an image (JPEG, PNG or WebP)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(bytes(raw)))
    except Image.DecompressionBombError as error:
        raise RequestError(f"image too large: {error}", 413, "ImageTooLarge") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(
            "not an image: send JPEG, PNG or WebP bytes", 415, "UnsupportedMediaType"
        ) from None
    width, height = picture.size
    if width * height > max_image_pixels:
        raise RequestError(
            f"image too large: {width}x{height} = {width * height} pixels, the limit is {max_image_pixels}",
            413,
            "ImageTooLarge",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture.load()
            if picture.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # most images: no copy for this
                picture = ImageOps.exif_transpose(picture)
            if picture.mode != "RGB":
                picture = picture.convert("RGB")
            array = np.array(picture)  # the one copy: decoded RGB [h, w, 3]
    except (OSError, ValueError, SyntaxError) as error:
        raise RequestError(
            f"cannot decode the image (truncated or corrupt): {error}", 400, "InvalidImage"
        ) from None
    return torch.from_numpy(array).permute(2, 0, 1)  # a [3, h, w] view (channels-last strides), not a copy


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_png(gray: np.ndarray) -> bytes:
    """uint8 ``[h, w]`` -> 8-bit grayscale PNG bytes.

    Written directly with zlib: every row uses the PNG "Up" filter (row minus the row above, one NumPy
    subtraction), which suits smooth heatmaps, and zlib level 1: at 451x300 this takes ~1.0 ms and ~27 KB
    against ~1.9 ms and ~23 KB for Pillow at level 1 (~3-5x faster than Pillow's default level 6 at
    ~1.4x its 19 KB). Above 16 MP level 6 keeps large heatmaps far from the response limit.
    """
    gray = np.ascontiguousarray(gray, dtype=np.uint8)
    height, width = gray.shape
    rows = np.empty((height, width + 1), np.uint8)
    rows[:, 0] = 2  # filter type Up
    rows[:1, 1:] = gray[:1]
    np.subtract(gray[1:], gray[:-1], out=rows[1:, 1:])  # modulo 256, as the filter defines
    level = 1 if gray.size <= 16_000_000 else 6
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
        + _chunk(b"IEND", b"")
    )


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """uint8 ``[h, w, 3]`` -> JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_raw(values: np.ndarray, fmt: str) -> tuple[bytes, dict[str, Any]]:
    """A float map ``[h, w]`` -> ``(bytes, {"dtype": ..., "shape": [h, w]})``.

    ``float16``: the values rounded to IEEE half precision (relative error <= 2**-11 for |x| in
    6.1e-5..65504), little-endian, row-major: ``np.frombuffer(data, "<f2").reshape(shape)``.
    ``npy``: a NumPy ``.npy`` file of the float32 values (``np.load(io.BytesIO(data))``).
    """
    if fmt == "float16":
        array = np.asarray(values, dtype="<f2")
        return array.tobytes(), {"dtype": "float16", "byte_order": "little", "shape": list(array.shape)}
    if fmt == "npy":
        array = np.ascontiguousarray(values, dtype=np.float32)
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue(), {"dtype": "float32", "shape": list(array.shape)}
    raise ValueError(f"raw format must be one of {', '.join(RAW_FORMATS)}, got {fmt!r}")


def decode_base64(value: Any, key: str) -> bytes:
    """The bytes of a base64 string (a ``data:...;base64,`` URL's payload too); :class:`RequestError` naming ``key``."""
    if not isinstance(value, str):
        raise RequestError(f"{key} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{key} is not valid base64") from None
