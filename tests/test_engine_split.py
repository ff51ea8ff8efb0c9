"""cam_engine.split: a model cut at its target layer gives the same CAMs, with no graph before the cut."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cam_engine
from cam_engine.split import ForwardSplit, split_at
from cam_engine.targets import ClassifierOutputTarget

METHODS = ["gradcam", "hirescam", "gradcam++", "xgradcam", "layercam", "gradcam_elementwise", "eigencam",
           "eigengradcam", "fem", "shapleycam", "scorecam"]  # fmt: skip



@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self.conv(x)).mean(dim=(2, 3)))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # fx cannot trace a branch on a value
            y = y * 2
        return self.fc(y.mean(dim=(2, 3)))


def test_prefix_and_tail_compose_to_the_model(resnet, batch) -> None:
    split = split_at(resnet, resnet.layer4, batch)
    assert split is not None and split.layer is resnet.layer4
    with torch.no_grad():
        activation = split.prefix(batch)
        assert activation.shape == (3, 512, 2, 2)
        assert torch.equal(split.tail(activation), resnet(batch))


# scorecam runs the whole model once per channel and image (1,536 passes here) without the split: it is
# compared in `make test-peer`; the ten other methods check the split here
@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.peer) if m == "scorecam" else m for m in METHODS])
def test_same_cams_with_and_without_the_split(resnet, batch, name) -> None:
    targets = [[ClassifierOutputTarget(1)], [ClassifierOutputTarget(4), ClassifierOutputTarget(2)], []]
    plain = cam_engine.create(name, resnet, [resnet.layer4]).run(batch, targets)
    cam = cam_engine.create(name, resnet, [resnet.layer4])
    cam.forward_split = split_at(resnet, resnet.layer4)
    got = cam.run(batch, targets)
    assert got.pairs == plain.pairs == [(0, 0), (1, 0), (1, 1)]
    assert torch.equal(got.outputs, plain.outputs)
    torch.testing.assert_close(got.cams, plain.cams, rtol=0, atol=1e-6)


def test_split_gradcam_matches_the_oracle(resnet, batch, oracle) -> None:
    targets = [ClassifierOutputTarget(c) for c in (0, 5, 9)]
    cam = cam_engine.GradCAM(model=resnet, target_layers=[resnet.layer4])
    cam.forward_split = split_at(resnet, resnet.layer4)
    got = cam(batch, targets)
    with oracle.GradCAM(model=resnet, target_layers=[resnet.layer4]) as reference:
        expected = reference(batch, targets)
    assert got.shape == expected.shape == (3, 64, 64)
    assert abs(got - expected).max() < 1e-5


def test_gradcam_with_a_split_is_the_formula_on_the_prefix_output(resnet, batch) -> None:
    """GradCAM = relu(sum_c mean_hw(dy/dA_c) A_c), min-max scaled, upsampled: A from the prefix, dy/dA
    through the tail alone."""
    split = split_at(resnet, resnet.layer4)
    with torch.no_grad():
        activations = split.prefix(batch)
    leaf = activations.clone().requires_grad_(True)
    scores = split.tail(leaf)
    (gradients,) = torch.autograd.grad(scores[:, 3].sum(), leaf)
    raw = (gradients.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1).clamp_min(0)
    low = raw.flatten(1).min(dim=1).values[:, None, None]
    high = raw.flatten(1).max(dim=1).values[:, None, None]
    scaled = (raw - low) / (high - low + 1e-7)
    expected = nn.functional.interpolate(scaled[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    cam = cam_engine.create("gradcam", resnet, [resnet.layer4])
    cam.forward_split = split
    got = cam.explain(batch, [ClassifierOutputTarget(3)] * 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_prefix_runs_without_gradients_and_may_be_any_callable(resnet, batch) -> None:
    split = split_at(resnet, resnet.layer4)
    seen: list[bool] = []
    traced = torch.jit.trace(split.prefix, batch)  # e.g. a compiled copy

    def prefix(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        return traced(x)

    cam = cam_engine.create("gradcam", resnet, [resnet.layer4])
    cam.forward_split = ForwardSplit(resnet.layer4, prefix, split.tail)
    got = cam.explain(batch)
    expected = cam_engine.create("gradcam", resnet, [resnet.layer4]).explain(batch)
    assert seen == [False]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_split_at_another_layer_is_ignored(resnet, batch) -> None:
    cam = cam_engine.create("gradcam", resnet, [resnet.layer3])
    cam.forward_split = ForwardSplit(resnet.layer4, lambda x: pytest.fail("prefix used"), lambda a: pytest.fail("tail used"))
    expected = cam_engine.create("gradcam", resnet, [resnet.layer3]).explain(batch)
    assert torch.equal(cam.explain(batch), expected)


def test_no_split_where_the_cut_is_not_clean(resnet, batch) -> None:
    assert split_at(resnet, resnet.layer4[0].conv1) is None  # the block's shortcut crosses the cut
    assert split_at(resnet, resnet) is None  # the model itself
    assert split_at(resnet, nn.Linear(1, 1)) is None  # not a submodule
    assert split_at(CalledTwice(), CalledTwice().conv) is None
    model = CalledTwice()
    assert split_at(model, model.conv) is None  # called twice
    model = DataDependent()
    assert split_at(model, model.conv) is None  # not symbolically traceable


def test_the_example_check_refuses_a_wrong_split(resnet, batch) -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.drop = nn.Dropout(0.5)  # training mode: the outputs differ from pass to pass

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.conv(x)).mean(dim=(2, 3))

    model = Noisy().train()
    assert split_at(model, model.conv) is not None
    assert split_at(model, model.conv, torch.rand(4, 3, 8, 8)) is None
