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
from isal import isal_zlib
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

    Written directly: every row uses the PNG "Sub" filter (each byte minus its left neighbour, one NumPy
    subtraction), and the IDAT stream is deflated by ISA-L (``isal``, zlib-compatible output) at level 1.
    A heatmap is a smooth map resized to the photo, so its left differences are short runs of a few
    values. On 451x300 CAMs of four skimage photos (mean): 0.13 ms and 18 KB, against 0.96 ms and 27 KB
    for zlib level 1 on "Up"-filtered rows (this encoder's previous form) and ~1.9 ms for Pillow at
    level 1; a 4000x3000 heatmap takes ~7-12 ms and ~0.7 MB.
    """
    gray = np.ascontiguousarray(gray, dtype=np.uint8)
    height, width = gray.shape
    rows = np.empty((height, width + 1), np.uint8)
    rows[:, 0] = 1  # filter type Sub
    rows[:, 1] = gray[:, 0]
    np.subtract(gray[:, 1:], gray[:, :-1], out=rows[:, 2:])  # modulo 256, as the filter defines
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", isal_zlib.compress(rows.data, 1))
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
