"""Request payloads for tests: good images and every kind of bad input the handlers must refuse."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def square_image(height: int, width: int, box: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """A noisy gray uint8 RGB image ``[height, width, 3]`` with a bright square at (top, left, bottom, right)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 100, size=(height, width, 3), dtype=np.uint8)
    top, left, bottom, right = box
    image[top:bottom, left:right] = (250, 240, 30)
    return image


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A few-KB PNG whose header claims ``width x height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    rows = zlib.compress(b"\x00" * (width + 1) * 64, 9)  # only the first rows: the rest would be zeros too
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    data = encode(square_image(200, 300, (50, 50, 120, 150)), "JPEG", quality=90)
    return data[: len(data) // 2]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def bad_payloads(good_png: bytes, num_classes: int) -> dict[str, tuple[object, int]]:
    """name -> (TorchServe request body: bytes or a JSON-able dict, expected status)."""
    return {
        "empty_body": (b"", 400),
        "not_an_image": (b"this is plain text, not a picture", 415),
        "truncated_jpeg": (truncated_jpeg(), 400),
        "decompression_bomb": (bomb_png(), 413),
        "image_not_a_string": ({"image": 12345}, 400),
        "bad_base64": ({"image": "%%% not base64 %%%"}, 400),
        "top_k_wrong_type": ({"image": b64(good_png), "top_k": "3"}, 400),
        "top_k_over_the_classes": ({"image": b64(good_png), "top_k": num_classes + 1}, 400),
        "targets_wrong_type": ({"image": b64(good_png), "targets": {"a": 1}}, 400),
        "unknown_method": ({"image": b64(good_png), "method": "deepdream"}, 400),
        "target_out_of_range": ({"image": b64(good_png), "targets": [num_classes]}, 400),
        "too_many_targets": ({"image": b64(good_png), "targets": list(range(6))}, 400),
        "unknown_label": ({"image": b64(good_png), "targets": ["unicorn"]}, 400),
        "unknown_option": ({"image": b64(good_png), "colour": "red"}, 400),
        "explain_wrong_type": ({"image": b64(good_png), "explain": "yes"}, 400),
    }
