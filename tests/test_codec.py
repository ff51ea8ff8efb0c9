"""The request path's image codecs and the stretch shortcut of the inverse mapping, against references:
PIL's own EXIF transpose + RGB conversion for decoding, a PNG round trip for encoding, and the
interpolation matrices of ``inverse_matrix`` for ``to_source``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from handlers.serving.base import decode_image, encode_png
from handlers.serving.preprocess import Geometry, inverse_matrix, to_source


def _picture(mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    return rgb.convert(mode)


def _reference(raw: bytes) -> np.ndarray:
    """The earlier decoder: always EXIF-transpose, always convert to RGB; 16-bit gray scaled by 65535 -> 255
    (Pillow's own conversion clips it at 255 instead: a 16-bit photo came out white)."""
    picture = ImageOps.exif_transpose(Image.open(io.BytesIO(raw)))
    if picture.mode == "I;16":
        gray = np.rint(np.asarray(picture) / 257).astype(np.uint8)
        return np.stack([gray] * 3, axis=2)
    return np.asarray(picture.convert("RGB"))


@pytest.mark.parametrize(
    ("mode", "fmt"), [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("I;16", "PNG"),
                      ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "WEBP")],
)  # fmt: skip
def test_decode_matches_pil_reference(mode, fmt):
    buffer = io.BytesIO()
    _picture(mode).save(buffer, format=fmt)
    raw = buffer.getvalue()
    decoded = decode_image(raw, 10_000)
    assert decoded.dtype == torch.uint8 and tuple(decoded.shape) == (3, 37, 53)
    assert np.array_equal(decoded.permute(1, 2, 0).numpy(), _reference(raw))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_applies_every_exif_orientation(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    _picture("RGB").save(buffer, format="JPEG", exif=exif.tobytes())
    raw = buffer.getvalue()
    decoded = decode_image(raw, 10_000).permute(1, 2, 0).numpy()
    expected = _reference(raw)
    assert decoded.shape == expected.shape == ((37, 53, 3) if orientation < 5 else (53, 37, 3))
    assert np.array_equal(decoded, expected)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (224, 224), (300, 451), (5000, 4000)])
def test_png_round_trip(shape):
    ramp = (np.add.outer(np.arange(shape[0]), 3 * np.arange(shape[1])) * 7) % 256  # wraps: differences < 0
    noise = np.random.default_rng(0).integers(0, 256, shape)  # incompressible: every byte value, stored blocks
    for gray in (ramp.astype(np.uint8), noise.astype(np.uint8)):
        data = encode_png(gray)
        picture = Image.open(io.BytesIO(data))
        assert picture.format == "PNG" and picture.mode == "L"
        assert np.array_equal(np.asarray(picture), gray)


@pytest.mark.parametrize("source", [(224, 224), (300, 451), (100, 50), (1000, 37), (7, 500), (224, 225)])
def test_stretch_inverse_equals_the_interpolation_matrices(source):
    geometry = Geometry(source, (224, 224), (0, 0), (224, 224))
    cams = torch.rand(2, 224, 224, generator=torch.Generator().manual_seed(1))
    sy, sx = geometry.scale
    expected = inverse_matrix(source[0], 224, sy, 0) @ cams @ inverse_matrix(source[1], 224, sx, 0).T
    mapped = to_source(cams, geometry)
    assert mapped.shape == (2, *source)
    torch.testing.assert_close(mapped, expected, atol=2e-5, rtol=0)
