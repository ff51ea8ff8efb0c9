"""Preprocessing geometry and its exact inverse: a heatmap lands where the pixels were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from handlers.config import PreprocessingConfig
from handlers.serving.preprocess import inverse_matrix, plan, preprocess, to_source

CONFIGS = {
    "stretch": PreprocessingConfig(),
    "letterbox": PreprocessingConfig(resize="letterbox"),
    "shorter_side+crop": PreprocessingConfig(resize="shorter_side", resize_size=(256, 256), crop=True),
    "stretch+crop": PreprocessingConfig(resize_size=(256, 256), crop=True),
}


def test_stretch_inverse_is_bilinear_resize() -> None:
    cams = torch.rand(3, 224, 224)
    geometry = plan((300, 900), CONFIGS["stretch"])
    expected = F.interpolate(cams[:, None], size=(300, 900), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(to_source(cams, geometry), expected, atol=1e-5, rtol=0)


def test_geometry_numbers() -> None:
    letterbox = plan((300, 900), CONFIGS["letterbox"])
    assert letterbox.resized_size == (75, 224) and letterbox.offset == (74, 0)
    crop = plan((300, 900), CONFIGS["shorter_side+crop"])
    assert crop.resized_size == (256, 768) and crop.offset == (-16, -272)


def test_inverse_matrix_rows_sum_to_one_inside_and_zero_outside() -> None:
    # 900 source columns scaled by 768/900 and shifted by -272: columns mapping outside [0, 224) are unseen.
    weights = inverse_matrix(900, 224, 768 / 900, -272)
    centres = (torch.arange(900) + 0.5) * 768 / 900 - 272
    inside = (centres >= 0) & (centres <= 224)
    torch.testing.assert_close(weights.sum(1), inside.float())


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("size", [(300, 900), (640, 480), (224, 224)])
def test_round_trip_puts_a_square_back_where_it_was(name: str, size: tuple[int, int]) -> None:
    """A bright square, preprocessed, used as a 'CAM' and mapped back, covers the same pixels."""
    config = CONFIGS[name]
    height, width = size
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    top, left, side = height // 3, width // 2 - 20, min(height, width) // 4
    image[:, top : top + side, left : left + side] = 255
    model_input, geometry = preprocess(image, config)
    assert model_input.shape == (3, *config.input_size)
    std, mean = torch.tensor(config.std)[:, None, None], torch.tensor(config.mean)[:, None, None]
    seen = (model_input * std + mean)[0].clamp(0, 1)  # back to [0, 1] brightness
    mapped = to_source(seen[None], geometry)[0]
    assert mapped.shape == (height, width)
    truth = image[0] > 0
    predicted = mapped > 0.5
    iou = (truth & predicted).sum() / (truth | predicted).sum()
    assert iou > 0.9, f"{name} {size}: IoU {iou:.3f}"


def test_zero_outside_the_crop() -> None:
    config = CONFIGS["shorter_side+crop"]
    geometry = plan((300, 900), config)
    mapped = to_source(torch.ones(1, 224, 224), geometry)[0]
    # the crop keeps source columns [318.75, 581.25) of 900 and rows [18.75, 281.25) of 300
    assert mapped[:, :318].max() == 0 and mapped[:, 582:].max() == 0
    assert mapped[:18].max() == 0 and mapped[282:].max() == 0
    assert mapped[19:281, 319:581].min() == 1
