"""cam_engine against the oracle (pytorch-grad-cam 1.5.7) for every single-pass method.

Random-init resnet18 and a small ViT; with and without eigen_smooth and aug_smooth; several
target layers. Threshold: Pearson r >= 0.99 per image. Eigen projections have an arbitrary sign in
the reference; the oracle fixture aligns it with cam_engine's convention, so a sign flip is not
forgiven but required to match.

``make test`` runs every method plain and with eigen_smooth, on both models and on two layers;
aug_smooth (the same six test-time augmentations around any method, so one code path for all) with
GradCAM (gradient weights) and EigenCAM (gradient-free). A wrong formula in any method, in eigen_smooth
or in aug_smooth therefore fails here. aug_smooth for every other method (78% of this file's time)
is marked ``peer`` and runs in ``make test-peer``.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import cam_engine
from cam_engine.targets import ClassifierOutputTarget
from tests.helpers.oracle import pearson

METHODS = [
    "GradCAM",
    "HiResCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "GradCAMElementWise",
    "EigenCAM",
    "EigenGradCAM",
    "KPCA_CAM",
    "FEM",
    "ShapleyCAM",
    "FinerCAM",
]


AUG_IN_MAKE_TEST = {"GradCAM", "EigenCAM"}


def grid(names: list[str]) -> list:
    """(name, eigen, aug) for every method, with aug_smooth beyond AUG_IN_MAKE_TEST marked peer."""
    return [
        pytest.param(name, eigen, aug, id=f"{name}-{'eigen' if eigen else ''}-{'aug' if aug else 'plain'}",
                     marks=[pytest.mark.peer] if aug and name not in AUG_IN_MAKE_TEST else [])
        for name in names for eigen in (False, True) for aug in (False, True)
    ]


def vit_tokens_to_maps(tensor, height=8, width=8):
    """The reference's own ViT reshape with this model's grid (its default assumes 14x14)."""
    return tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2)).permute(0, 3, 1, 2)



@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.models.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10
    ).eval()


def compare(oracle, name, model, layers, x, targets, aug, eigen, ours_reshape=None, ref_reshape=None):
    ours = getattr(cam_engine, name)(model, layers, reshape_transform=ours_reshape)
    reference = getattr(oracle, name)(model, layers, reshape_transform=ref_reshape)
    kwargs = {"eigen_smooth": eigen}
    if name == "FinerCAM":
        got = ours(x, None, **kwargs)
        with sdpa_kernel([SDPBackend.MATH]):
            expected = reference(x, None, **kwargs)
    else:
        got = ours(x, targets, aug_smooth=aug, **kwargs)
        with sdpa_kernel([SDPBackend.MATH]):
            expected = reference(x, targets, aug_smooth=aug, **kwargs)
    assert got.shape == expected.shape == (x.shape[0], *x.shape[2:])
    assert got.dtype == np.float32
    assert got.min() >= 0 and got.max() <= 1
    r = pearson(got, expected)
    assert (r >= 0.99).all(), f"{name} eigen={eigen} aug={aug}: r={np.round(r, 4)}"


@pytest.mark.parametrize(("name", "eigen", "aug"), grid(METHODS))
def test_resnet18_layer4(oracle, resnet, name, eigen, aug):
    if name == "FinerCAM" and aug:
        pytest.skip("the reference FinerCAM has no aug_smooth")
    torch.manual_seed(1)
    x = torch.randn(2, 3, 128, 128)
    targets = [ClassifierOutputTarget(3), ClassifierOutputTarget(7)]
    compare(oracle, name, resnet, [resnet.layer4[-1]], x, targets, aug, eigen)


@pytest.mark.parametrize("name", METHODS)
def test_resnet18_two_layers(oracle, resnet, name):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 96, 128)  # non-square input
    targets = [ClassifierOutputTarget(1), ClassifierOutputTarget(1)]
    compare(oracle, name, resnet, [resnet.layer3[-1], resnet.layer4[-1]], x, targets, False, False)


@pytest.mark.parametrize(("name", "eigen", "aug"), grid([m for m in METHODS if m != "ShapleyCAM"]))
def test_vit(oracle, vit, name, eigen, aug):
    # The reference ShapleyCAM cannot run on token layers (it applies its weights to un-reshaped
    # activations); cam_engine's is checked against a direct formula in test_engine.py.
    if name == "FinerCAM" and aug:
        pytest.skip("the reference FinerCAM has no aug_smooth")
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    targets = [ClassifierOutputTarget(2), ClassifierOutputTarget(5)]
    compare(
        oracle, name, vit, [vit.blocks[-1].norm1], x, targets, aug, eigen,
        ours_reshape=cam_engine.reshape.vit_reshape_transform, ref_reshape=vit_tokens_to_maps,
    )


def test_default_targets_explain_top_class(oracle, resnet):
    torch.manual_seed(4)
    x = torch.randn(3, 3, 96, 96)
    got = cam_engine.GradCAM(resnet, [resnet.layer4[-1]])(x)
    expected = oracle.GradCAM(resnet, [resnet.layer4[-1]])(x, None)
    top = resnet(x).argmax(1).tolist()
    explicit = cam_engine.GradCAM(resnet, [resnet.layer4[-1]])(x, [ClassifierOutputTarget(c) for c in top])
    assert (pearson(got, expected) >= 0.99).all()
    np.testing.assert_allclose(got, explicit, atol=1e-6)


# --------------------------------------------------------------------------- targets


def test_targets_match_reference(oracle):
    from pytorch_grad_cam.utils import model_targets as ref

    from cam_engine import targets as ours

    torch.manual_seed(5)
    logits = torch.randn(10)
    batch_logits = torch.randn(4, 10)
    for our_cls, ref_cls in [
        (ours.ClassifierOutputTarget, ref.ClassifierOutputTarget),
        (ours.ClassifierOutputSoftmaxTarget, ref.ClassifierOutputSoftmaxTarget),
        (ours.ClassifierOutputReST, ref.ClassifierOutputReST),
        (ours.BinaryClassifierOutputTarget, ref.BinaryClassifierOutputTarget),
    ]:
        for category in (0, 1, 7):
            torch.testing.assert_close(our_cls(category)(logits), ref_cls(category)(logits))
            torch.testing.assert_close(our_cls(category)(batch_logits), ref_cls(category)(batch_logits))

    finer = ours.FinerWeightedTarget(2, [4, 5, 6], 0.7)(logits)
    torch.testing.assert_close(finer, ref.FinerWeightedTarget(2, [4, 5, 6], 0.7)(logits))

    seg = torch.randn(3, 8, 8)
    mask = (torch.rand(8, 8) > 0.5).numpy().astype(np.float32)
    torch.testing.assert_close(
        ours.SemanticSegmentationTarget(1, mask)(seg), ref.SemanticSegmentationTarget(1, mask)(seg)
    )
    embedding, concept = torch.randn(16), torch.randn(16)
    expected = torch.nn.functional.cosine_similarity(embedding, concept, dim=0)
    torch.testing.assert_close(ours.SimilarityToConceptTarget(concept)(embedding), expected)
    torch.testing.assert_close(ours.DifferenceFromConceptTarget(concept)(embedding), 1 - expected)

    detections = {
        "boxes": torch.tensor([[10.0, 10, 50, 50], [60, 60, 90, 90]]),
        "labels": torch.tensor([3, 5]),
        "scores": torch.tensor([0.9, 0.4]),
    }
    boxes = np.array([[12.0, 11, 49, 52], [60, 60, 90, 90], [0, 0, 5, 5]])
    labels = [3, 4, 1]
    torch.testing.assert_close(
        ours.FasterRCNNBoxScoreTarget(labels, boxes)(detections),
        ref.FasterRCNNBoxScoreTarget(labels, boxes)(detections),
    )
