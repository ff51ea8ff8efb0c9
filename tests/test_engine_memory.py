"""cam_engine keeps nothing it explained alive: no model, module, hook or tensor outlives the CAM object.

A notebook or batch job that explains many models in one process must stay flat in memory, as
pytorch-grad-cam 1.5.7 does on the same loop (its own memory test builds and drops models in a loop).
"""

from __future__ import annotations

import gc
import weakref

import psutil
import pytest
import torch
import torchvision

import cam_engine
from cam_engine.targets import ClassifierOutputTarget


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.parametrize("method", ["gradcam", "eigencam", "scorecam", "fullgrad"])
def test_the_model_dies_with_its_last_reference(method: str) -> None:
    model = torchvision.models.resnet18(num_classes=4).eval()
    layer = model.layer4[-1]
    with cam_engine.get_method(method)(model=model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=torch.rand(1, 3, 32, 32), targets=[ClassifierOutputTarget(1)])
    assert maps.shape == (1, 32, 32)
    model_ref, layer_ref = weakref.ref(model), weakref.ref(layer)
    del model, layer, cam
    gc.collect()
    assert model_ref() is None, "cam_engine still holds the model"
    assert layer_ref() is None, "cam_engine still holds the target layer"


def test_the_model_dies_without_the_with_block_and_with_the_torch_entry() -> None:
    model = torchvision.models.resnet18(num_classes=4).eval()
    result = cam_engine.create("gradcam", model, ["layer4"]).run(torch.rand(2, 3, 32, 32))
    assert result.cams.shape[0] == 2
    model_ref = weakref.ref(model)
    del model
    gc.collect()
    assert model_ref() is None


def test_explaining_twenty_models_in_one_process_keeps_memory_flat() -> None:
    """ResNet-50 is ~98 MB of parameters: leaking it 20 times would add ~2 GB."""
    torch.set_grad_enabled(True)
    x = torch.rand(1, 3, 64, 64)
    start = None
    for index in range(20):
        model = torchvision.models.resnet50(num_classes=1000).eval()
        with cam_engine.GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
            cam(input_tensor=x, targets=[ClassifierOutputTarget(index)])
        del model, cam
        if index == 1:  # allocator and lazy imports settled after the first two
            start = _rss_mb()
    assert start is not None
    grown = _rss_mb() - start
    assert grown < 100, f"resident memory grew by {grown:.0f} MB over 18 models"
