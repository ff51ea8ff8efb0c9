"""Heatmaps land on the object: models trained here for seconds on synthetic shapes (no downloads).

The class of an image is the colour of its one object on a grey noisy background, so the only
class evidence is on the object; on held-out images the heatmap's peak must fall inside the
object's box for at least 90% of images.
"""

from __future__ import annotations

import pytest
import torch

import cam_engine
from cam_engine.targets import ClassifierOutputTarget
from tests.helpers.synthetic import make_shapes, peak_in_box, tiny_vit, trained

LOCALISING = ["gradcam", "hirescam", "gradcam++", "xgradcam", "layercam"]


@pytest.fixture(scope="module")
def trained_vit():
    torch.manual_seed(0)  # the initial weights too: the suite passes in any order
    model = tiny_vit()
    accuracy = trained(model, steps=100, size=32, shape_size=(10, 16), one_vs_rest=True)
    assert accuracy >= 0.95, f"the ViT did not learn the task (accuracy {accuracy:.2f})"
    return model


@pytest.mark.parametrize("method", LOCALISING)
def test_cnn_heatmap_peak_on_object(trained_cnn, method):
    images, labels, boxes = make_shapes(100, size=64, seed=123)
    cams = cam_engine.create(method, trained_cnn, ["features.-1"]).explain(
        images, [ClassifierOutputTarget(int(c)) for c in labels]
    )
    hit_rate = float(peak_in_box(cams, boxes).float().mean())
    assert hit_rate >= 0.9, f"{method}: peak inside the object's box for {hit_rate:.0%} of images"


@pytest.mark.parametrize("method", LOCALISING)
def test_vit_heatmap_peak_on_object(trained_vit, method):
    # blocks.-1 is the last token map before the pooled head (the ViT's "last conv layer").
    images, labels, boxes = make_shapes(100, size=32, seed=123, shape_size=(10, 16))
    cams = cam_engine.create(
        method, trained_vit, ["blocks.-1"], reshape_transform=cam_engine.reshape.vit_reshape_transform
    ).explain(images, [ClassifierOutputTarget(int(c)) for c in labels])
    assert cams.shape == (100, 32, 32)
    hit_rate = float(peak_in_box(cams, boxes).float().mean())
    assert hit_rate >= 0.9, f"{method}: peak inside the object's box for {hit_rate:.0%} of images"


def test_wrong_class_does_not_localise_as_well(trained_cnn):
    """The check has teeth: explaining a class absent from the image scores clearly worse."""
    images, labels, boxes = make_shapes(100, size=64, seed=123)
    wrong = [ClassifierOutputTarget(int(c + 1) % 3) for c in labels]
    cams = cam_engine.GradCAM(trained_cnn, ["features.-1"]).explain(images, wrong)
    assert float(peak_in_box(cams, boxes).float().mean()) < 0.8
