"""Image helpers against the reference's NumPy/OpenCV versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cam_engine import image


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.random((48, 64, 3), dtype=np.float32)


def test_preprocess_and_deprocess_match_reference(oracle, rgb):
    from pytorch_grad_cam.utils import image as ref

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    torch.testing.assert_close(image.preprocess_image(rgb, mean, std), ref.preprocess_image(rgb, mean, std))
    uint8 = (rgb * 255).astype(np.uint8)
    torch.testing.assert_close(image.preprocess_image(uint8), ref.preprocess_image(uint8))
    gradients = np.random.default_rng(1).normal(size=(48, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(image.deprocess_image(gradients), ref.deprocess_image(gradients))


def test_scale_cam_image_matches_reference(oracle):
    from pytorch_grad_cam.utils import image as ref

    cams = np.random.default_rng(2).random((3, 7, 9), dtype=np.float32)
    np.testing.assert_allclose(image.scale_cam_image(cams), ref.scale_cam_image(cams), atol=1e-6)
    np.testing.assert_allclose(image.scale_cam_image(cams, (45, 35)), ref.scale_cam_image(cams, (45, 35)), atol=1e-5)


@pytest.mark.parametrize("use_rgb", [True, False])
def test_show_cam_on_image_matches_reference(oracle, rgb, use_rgb):
    from pytorch_grad_cam.utils import image as ref

    mask = np.random.default_rng(3).random((48, 64), dtype=np.float32)
    ours = image.show_cam_on_image(rgb, mask, use_rgb=use_rgb, image_weight=0.4)
    expected = ref.show_cam_on_image(rgb, mask, use_rgb=use_rgb, image_weight=0.4)
    assert ours.dtype == np.uint8 and ours.shape == expected.shape
    # The jet colour map is computed, not read from OpenCV's table: within 2 levels of it.
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 2
    with pytest.raises(ValueError):
        image.show_cam_on_image(rgb * 255, mask)


def test_torch_colour_map_and_overlay():
    cam = torch.linspace(0, 1, 16).reshape(4, 4)
    colours = image.colorize(cam)
    assert colours.dtype == torch.uint8 and colours.shape == (4, 4, 3)
    assert colours[0, 0].tolist() == [0, 0, 128]  # jet starts dark blue
    assert colours[-1, -1].tolist() == [128, 0, 0]  # and ends dark red
    picture = torch.full((8, 12, 3), 200, dtype=torch.uint8)
    blended = image.overlay(picture, cam, image_weight=0.5)
    assert blended.shape == (8, 12, 3) and blended.dtype == torch.uint8
    assert int(blended.max()) == 255  # rescaled so the brightest value is white-level
    with pytest.raises(ValueError):
        image.overlay(picture, cam, image_weight=1.5)
