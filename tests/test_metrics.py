"""Faithfulness metrics against grad-cam 1.5.7, the imputation's equations, and a ROAD sanity check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cam_engine
import cam_engine.metrics as metrics
from cam_engine.metrics.road import NEIGHBORS_WEIGHTS, NoisyLinearImputer
from cam_engine.targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

pg_road = pytest.importorskip("pytorch_grad_cam.metrics.road")
pg_mult = pytest.importorskip("pytorch_grad_cam.metrics.cam_mult_image")

TOLERANCE = 0.02


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(128, 5)).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=generator)
    # smooth maps without ties, like upsampled CAMs
    cams = F.interpolate(torch.rand(3, 1, 4, 4, generator=generator), size=(32, 32), mode="bilinear")[:, 0].numpy()
    targets = [ClassifierOutputTarget(0), ClassifierOutputSoftmaxTarget(1), ClassifierOutputTarget(4)]
    return model, x, cams, targets


CASES = [
    ("ROADMostRelevantFirst", {"percentile": 70}),
    ("ROADMostRelevantFirst", {"percentile": "auto"}),
    ("ROADLeastRelevantFirst", {}),
    ("ROADLeastRelevantFirst", {"percentile": "auto"}),
    ("ROADMostRelevantFirstAverage", {}),
    ("ROADLeastRelevantFirstAverage", {"percentiles": [25, 75]}),
    ("ROADCombined", {}),
    ("CamMultImageConfidenceChange", {}),
    ("DropInConfidence", {}),
    ("IncreaseInConfidence", {}),
]


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_metric_matches_reference(setting, name, options):
    model, x, cams, targets = setting
    reference_module = pg_mult if hasattr(pg_mult, name) else pg_road
    torch.manual_seed(7)  # the imputer's noise: both draw it in the same order
    ours = getattr(metrics, name)(**options)(x, cams, targets, model)
    torch.manual_seed(7)
    expected = getattr(reference_module, name)(**options)(x, cams, targets, model)
    assert isinstance(ours, np.ndarray) and ours.shape == (3,)
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE)
    np.testing.assert_allclose(ours, expected, atol=1e-5)  # in fact the same numbers


def test_imputation_solves_the_neighbour_equations():
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(3, 12, 10, generator=generator)
    mask = (torch.rand(12, 10, generator=generator) > 0.4).float()
    mask[0, 0] = 0  # a corner: its neighbour weights are renormalised
    filled = NoisyLinearImputer(noise=0.0)(image, mask)
    known = mask > 0.5
    torch.testing.assert_close(filled[:, known], image[:, known])
    for row, col in (~known).nonzero().tolist():
        total, weights = torch.zeros(3, dtype=torch.float64), 0.0
        for (d_row, d_col), weight in NEIGHBORS_WEIGHTS:
            r, c = row + d_row, col + d_col
            if 0 <= r < 12 and 0 <= c < 10:
                total += weight * filled[:, r, c].double()
                weights += weight
        torch.testing.assert_close(filled[:, row, col].double(), total / weights, atol=1e-5, rtol=1e-5)


def test_metrics_put_a_training_model_in_eval_and_restore_it(setting):
    model, x, cams, targets = setting
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    model.train()
    running = model[1].running_mean.clone()
    first = metrics.CamMultImageConfidenceChange()(x, cams, targets, model)
    second = metrics.CamMultImageConfidenceChange()(x, cams, targets, model)
    np.testing.assert_array_equal(first, second)
    assert model.training and torch.equal(model[1].running_mean, running)


# ------------------------------------------------------------------ faithfulness on a trained model
def test_road_combined_ranks_gradcam_above_randomcam(trained_cnn):
    localization_model = trained_cnn
    from tests.helpers.synthetic import make_shapes

    model = localization_model
    images, labels, _ = make_shapes(16, size=64, seed=321)
    targets = [ClassifierOutputTarget(int(c)) for c in labels]
    gradcam = cam_engine.GradCAM(model, ["features.-1"])(images, targets)
    random = cam_engine.RandomCAM(model, ["features.-1"], seed=0)(images, targets)
    torch.manual_seed(0)
    road_gradcam = metrics.ROADCombined()(images, gradcam, targets, model)
    torch.manual_seed(0)
    road_random = metrics.ROADCombined()(images, random, targets, model)
    assert road_gradcam.shape == (16,)
    print(f"ROADCombined mean: GradCAM {road_gradcam.mean():.3f}, RandomCAM {road_random.mean():.3f}")
    assert road_gradcam.mean() > road_random.mean() + 0.1, (road_gradcam.mean(), road_random.mean())
