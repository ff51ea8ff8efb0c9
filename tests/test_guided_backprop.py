"""Guided backpropagation: whole batches, against grad-cam 1.5.7 run one image at a time."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import cam_engine
from cam_engine.guided_backprop import guided_gradcam
from cam_engine.image import deprocess_image
from cam_engine.targets import ClassifierOutputTarget

pg = pytest.importorskip("pytorch_grad_cam")



@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))


def _reference(model: nn.Module, x: torch.Tensor, category) -> np.ndarray:
    """grad-cam's guided backprop, one image per call (it explains only the first image of a batch)."""
    reference = pg.GuidedBackpropReLUModel(copy.deepcopy(model))
    return np.stack([reference(x[i : i + 1], None if category is None else category[i]) for i in range(len(x))])


@pytest.mark.parametrize("category", [None, [1, 7, 3]])
def test_batch_matches_reference_per_image(resnet, batch, category):
    ours = cam_engine.GuidedBackpropReLUModel(resnet)(batch, category)
    expected = _reference(resnet, batch, category)
    assert ours.shape == expected.shape == (3, 48, 48, 3)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(ours, expected, atol=1e-5 * scale)
    # Guided backprop is not the plain gradient: negative gradients were stopped at every ReLU.
    x = batch.clone().requires_grad_(True)
    plain = torch.autograd.grad(sum(resnet(x)[i, c] for i, c in enumerate(category or [0, 0, 0])), x)[0]
    assert not np.allclose(ours, plain.permute(0, 2, 3, 1).numpy(), atol=1e-3 * scale)


def test_single_image_keeps_reference_shape_and_targets(resnet, batch):
    gb = cam_engine.GuidedBackpropReLUModel(resnet)
    single = gb(batch[:1], 4)
    assert single.shape == (48, 48, 3)
    np.testing.assert_allclose(single, _reference(resnet, batch[:1], [4])[0], atol=1e-6)
    callables = gb.explain(batch, [ClassifierOutputTarget(4)] * 3)
    integers = gb.explain(batch, 4)
    torch.testing.assert_close(callables, integers)
    assert callables.shape == (3, 3, 48, 48)


def test_model_not_mutated(resnet, batch):
    model = copy.deepcopy(resnet).train()
    types = [type(m) for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    cam_engine.GuidedBackpropReLUModel(model)(batch)
    assert [type(m) for m in model.modules()] == types  # no ReLU swapped
    assert model.training
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_guided_gradcam_is_cam_times_guided_map(resnet, batch):
    cams = cam_engine.GradCAM(resnet, ["layer4"])(batch)
    guided = cam_engine.GuidedBackpropReLUModel(resnet)(batch)
    images = guided_gradcam(cams, guided)
    assert images.shape == (3, 48, 48, 3) and images.dtype == np.uint8
    for i in range(3):
        np.testing.assert_array_equal(images[i], deprocess_image(cams[i][..., None] * guided[i]))


def _relu6_as_relu_then_clamp(module: nn.Module) -> nn.Module:
    """Every ReLU6 -> Sequential(ReLU, Hardtanh(0, 6)): the same function, with a ReLU the reference guides."""
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU6):
            setattr(module, name, nn.Sequential(nn.ReLU(), nn.Hardtanh(0.0, 6.0)))
        else:
            _relu6_as_relu_then_clamp(child)
    return module


def test_relu6_networks_are_guided_too(batch):
    """A MobileNetV2 (ReLU6 everywhere): ours guides each ReLU6 as (0 < x < 6) * relu(grad). That is the
    reference's guided ReLU followed by the clamp's own mask, so the reference on the same network with
    each ReLU6 written as ReLU + Hardtanh(0, 6) must agree; the reference on the ReLU6 network does not."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    split = _relu6_as_relu_then_clamp(copy.deepcopy(model))
    x = batch * 3  # a wider input range, so some activations pass 6
    with torch.no_grad():
        assert torch.allclose(model(x), split(x), atol=1e-5)
    ours = cam_engine.GuidedBackpropReLUModel(model)(x, [1, 7, 3])
    expected = _reference(split, x, [1, 7, 3])
    scale = np.abs(expected).max()
    np.testing.assert_allclose(ours, expected, atol=1e-5 * scale)
    unguided = _reference(model, x, [1, 7, 3])  # the reference finds no nn.ReLU here
    assert not np.allclose(ours, unguided, atol=1e-3 * scale)
