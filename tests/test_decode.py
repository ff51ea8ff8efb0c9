"""handlers.serving.codec's decoder against references: the format allowlist (at open), full decodes (a JPEG
without its scan data is a 400, never a grey fill), 16-bit and float images by their range, multi-frame images,
header-only pixel counts, and the accepted base64 forms."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from handlers.config import HandlerConfig
from handlers.serving.codec import IMAGE_FORMATS, decode_base64, decode_image, image_pixels
from handlers.serving.errors import RequestError
from tests.helpers.images import ALLOWED_SAVES, REFUSED_SAVES, frames, jpeg_header_only, photo, save

LIMIT = 50_000_000


def _decoded(raw: bytes, **options) -> np.ndarray:
    return decode_image(raw, LIMIT, **options).permute(1, 2, 0).numpy()


def _refused(raw: bytes, **options) -> RequestError:
    with pytest.raises(RequestError) as caught:
        decode_image(raw, LIMIT, **options)
    return caught.value


@pytest.mark.parametrize("fmt", sorted(ALLOWED_SAVES))
def test_every_allowed_format_decodes_to_pillows_pixels(fmt):
    raw = save(photo(), fmt, **ALLOWED_SAVES[fmt])
    expected = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    assert np.array_equal(_decoded(raw), expected)
    assert image_pixels(raw) == 48 * 64


@pytest.mark.parametrize("fmt", sorted(REFUSED_SAVES))
def test_formats_outside_the_allowlist_are_415_without_any_of_their_code_running(fmt, monkeypatch):
    try:
        raw = save(photo(), fmt, **REFUSED_SAVES[fmt])
    except (OSError, KeyError, ValueError) as error:  # a writer missing from this Pillow build
        pytest.skip(f"Pillow cannot write {fmt} here: {error}")
    assert Image.open(io.BytesIO(raw)).format in (fmt, "DDS", "IM")  # Pillow itself would open it

    def looked_for(*args, **kwargs):
        raise AssertionError("Ghostscript was looked for")

    monkeypatch.setattr(shutil, "which", looked_for)  # how EpsImagePlugin finds gs
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", looked_for)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", looked_for)
    error = _refused(raw)
    assert (error.code, error.kind) == (415, "UnsupportedMediaType")
    assert "JPEG, PNG, WEBP, BMP, TIFF, GIF" in error.message
    assert image_pixels(raw) == 0


def test_the_allowlist_is_configurable_and_checked_at_load():
    jpeg, png = save(photo(), "JPEG"), save(photo(), "PNG")
    assert _refused(jpeg, formats=("PNG",)).code == 415 and _decoded(png, formats=("PNG",)).shape == (48, 64, 3)
    base = {"architecture": "resnet18", "target_layers": ["layer4"]}
    assert HandlerConfig.from_dict(base).image_formats == IMAGE_FORMATS
    assert HandlerConfig.from_dict({**base, "image_formats": ["jpg", "Png", "tif"]}).image_formats == ("JPEG", "PNG", "TIFF")
    with pytest.raises(ValueError, match=r"handler\.image_formats: HEIC cannot be opened here"):
        HandlerConfig.from_dict({**base, "image_formats": ["JPEG", "HEIC"]})


def test_a_format_allowed_on_purpose_still_answers_400_when_corrupt():
    raw = bytearray(save(photo(), "AVIF"))
    data = raw.index(b"mdat") + 8
    raw[data:] = bytes(len(raw) - data)  # zeroed colour planes: Pillow's AVIF decoder raises RuntimeError
    with pytest.raises(RuntimeError):
        Image.open(io.BytesIO(bytes(raw))).load()
    error = _refused(bytes(raw), formats=("AVIF",))
    assert (error.code, error.kind) == (400, "InvalidImage")


@pytest.mark.parametrize(
    "raw",
    [jpeg_header_only(300, 200), jpeg_header_only(300, 200, end=False), jpeg_header_only(6300, 6300)],
    ids=["scan-header-then-EOI", "scan-header-then-nothing", "6300x6300-no-scan"],
)
def test_a_jpeg_without_its_scan_data_is_400_not_a_grey_fill(raw):
    assert image_pixels(raw) in (300 * 200, 6300 * 6300)
    error = _refused(raw)
    assert (error.code, error.kind) == (400, "InvalidImage") and "truncated" in error.message


def test_cut_images_are_400_in_every_allowed_format():
    for fmt, options in ALLOWED_SAVES.items():
        raw = save(photo(96, 128), fmt, **options)
        error = _refused(raw[: len(raw) * 2 // 3])
        assert error.code in (400, 415), (fmt, error.message)


@pytest.mark.parametrize("size", [(1, 1), (8, 8), (17, 33), (1500, 2000)])
@pytest.mark.parametrize("progressive", [False, True])
def test_the_scan_data_bound_accepts_the_smallest_real_encodings(size, progressive):
    """Uniform images at quality 1 with optimised tables are the least scan data an encoder writes."""
    for value in (0, 255):
        for subsampling in (0, 2):
            raw = save(np.full((*size, 3), value, np.uint8), "JPEG", quality=1, optimize=True,
                       progressive=progressive, subsampling=subsampling)  # fmt: skip
            assert _decoded(raw).shape == (*size, 3)


def test_16_bit_images_are_scaled_by_their_range_not_clipped():
    eight = photo()[:, :, 0]
    sixteen = eight.astype(np.uint16) * 257  # the same picture, 16 bits deep
    for fmt in ("PNG", "TIFF"):
        raw = save(Image.fromarray(sixteen), fmt)
        assert Image.open(io.BytesIO(raw)).mode == "I;16"
        decoded = _decoded(raw)
        assert np.array_equal(decoded, np.stack([eight] * 3, 2)), fmt


def test_float_and_32_bit_images_are_scaled_by_their_range():
    eight = photo()[:, :, 1]
    gray = np.stack([eight] * 3, 2)
    unit = save(Image.fromarray(eight.astype(np.float32) / 255), "TIFF")  # floats in [0, 1]
    assert np.array_equal(_decoded(unit), gray)
    wide = eight.astype(np.float32) * 0.5 - 40.0  # floats outside [0, 255]: min-max
    expected = np.rint((wide - wide.min()) * 255 / (wide.max() - wide.min())).astype(np.uint8)
    assert np.array_equal(_decoded(save(Image.fromarray(wide), "TIFF"))[:, :, 0], expected)
    deep = save(Image.fromarray(eight.astype(np.int32) * 257), "TIFF")  # 32-bit integers holding 16-bit values
    assert np.array_equal(_decoded(deep), gray)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_multi_frame_images_are_refused_or_their_first_frame_used(fmt):
    options = {"lossless": True} if fmt == "WEBP" else {}
    raw = frames(fmt, **options)
    error = _refused(raw)
    assert (error.code, error.kind) == (400, "MultiFrameImage") and "2 frames" in error.message
    first = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    assert np.array_equal(_decoded(raw, multi_frame="first"), first)


def test_an_mpo_jpeg_is_its_primary_image():
    raw = frames("MPO")
    assert Image.open(io.BytesIO(raw)).format == "MPO"
    assert np.array_equal(_decoded(raw), np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))


def test_base64_in_its_standard_url_safe_unpadded_and_mime_forms():
    data = bytes(range(256)) * 3 + b"\xfb\xff"  # bytes whose encodings use + / and - _ and padding
    standard = base64.b64encode(data).decode()
    forms = {
        "standard": standard,
        "url-safe": base64.urlsafe_b64encode(data).decode(),
        "unpadded": standard.rstrip("="),
        "url-safe unpadded": base64.urlsafe_b64encode(data).decode().rstrip("="),
        "MIME": base64.encodebytes(data).decode(),  # 76-character lines
        "CRLF lines": "\r\n".join(standard[i : i + 64] for i in range(0, len(standard), 64)),
        "data URL": "data:image/png;base64," + standard,
    }
    assert "=" in standard and "+" in standard and "/" in standard
    for name, text in forms.items():
        assert decode_base64(text, "image") == data, name
    for bad in ("%%% not base64", standard[:-3] + "!" + standard[-2:], "a", "ab=c", standard + "A"):
        with pytest.raises(RequestError, match="image is not valid base64"):
            decode_base64(bad, "image")
