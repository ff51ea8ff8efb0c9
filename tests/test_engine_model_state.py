"""The engine's cached module walk (cam_engine.model_utils.all_modules) still honours every change of a
model's mode, dtype and structure between calls."""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

import cam_engine
from cam_engine.model_utils import all_modules, forget_modules, model_device_dtype
from cam_engine.targets import ClassifierOutputTarget

TARGETS = [ClassifierOutputTarget(1), ClassifierOutputTarget(6)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=8)
    for module in model.modules():  # running statistics unlike a batch's own: train mode shows in the outputs
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model.eval()


def _explain(model: nn.Module, x: torch.Tensor) -> cam_engine.CAMResult:
    return cam_engine.create("gradcam", model, ["layer4"]).run(x, [[t] for t in TARGETS])


def test_train_mode_set_between_calls_is_undone_inside_and_restored_after() -> None:
    model, x = _model(), torch.rand(2, 3, 64, 64)
    expected = _explain(model, x)
    with torch.no_grad():
        assert not torch.allclose(copy.deepcopy(model).train()(x), expected.outputs, atol=1e-3)  # train mode changes outputs
    model.train()
    got = _explain(model, x)
    assert all(m.training for m in model.modules())
    torch.testing.assert_close(got.outputs, expected.outputs)
    torch.testing.assert_close(got.cams, expected.cams)
    model.eval()
    model.layer4.train()  # one submodule only
    got = _explain(model, x)
    assert model.layer4[0].bn1.training and not model.bn1.training
    torch.testing.assert_close(got.cams, expected.cams)


def test_a_module_added_after_a_call_is_put_in_eval_mode() -> None:
    model, x = _model(), torch.rand(2, 3, 64, 64)
    _explain(model, x)
    model.fc = nn.Sequential(nn.Dropout(0.9), model.fc)  # in train mode: would zero most features
    model.fc[0].train()
    assert model.fc[0] in all_modules(model)
    first, second = _explain(model, x), _explain(model, x)
    torch.testing.assert_close(first.outputs, second.outputs)  # dropout off: deterministic
    assert model.fc[0].training


def test_structure_changes_that_bypass_registration_are_seen_after_forget_modules() -> None:
    layers = nn.ModuleList([nn.Identity()])
    before = all_modules(layers)
    layers.insert(0, nn.Dropout())  # ModuleList.insert writes _modules directly
    forget_modules(layers)
    assert len(all_modules(layers)) == len(before) + 1


def test_dtype_changed_between_calls_is_followed() -> None:
    model, x = _model(), torch.rand(2, 3, 64, 64)
    expected = _explain(model, x)
    assert model_device_dtype(model) == (torch.device("cpu"), torch.float32)
    model.double()
    assert model_device_dtype(model) == (torch.device("cpu"), torch.float64)
    got = _explain(model, x)
    assert got.outputs.dtype == torch.float64 and got.cams.dtype == torch.float32
    torch.testing.assert_close(got.cams, expected.cams, rtol=0, atol=1e-4)
    model.float()
    assert _explain(model, x).outputs.dtype == torch.float32


def test_device_and_dtype_of_models_without_floating_parameters() -> None:
    assert model_device_dtype(nn.ReLU()) == (torch.device("cpu"), None)
    counter = nn.Module()
    counter.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
    assert model_device_dtype(counter) == (torch.device("cpu"), None)
    counter.register_buffer("scale", torch.ones(1, dtype=torch.float16))
    assert model_device_dtype(counter) == (torch.device("cpu"), torch.float16)  # the first floating one
