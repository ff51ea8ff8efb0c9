"""cam_engine fix needed by the densenet121 config: in-place ops after the target layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import cam_engine
from cam_engine.targets import ClassifierOutputTarget


class Net(nn.Module):
    """conv -> bn (target) -> relu (in place or not) -> pool -> linear, like DenseNet's head."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.norm(self.conv(x)), inplace=self.inplace)
        return self.fc(F.adaptive_avg_pool2d(features, 1).flatten(1))


def test_inplace_relu_after_the_target_layer_gives_the_same_cam() -> None:
    torch.manual_seed(0)
    inplace, plain = Net(True).eval(), Net(False).eval()
    plain.load_state_dict(inplace.state_dict())
    with torch.no_grad():
        inplace.norm.running_mean.uniform_(-0.5, 0.5)
    plain.load_state_dict(inplace.state_dict())
    x = torch.randn(2, 3, 16, 16)
    targets = [ClassifierOutputTarget(1), ClassifierOutputTarget(3)]
    expected = cam_engine.create("gradcam", plain, ["norm"]).explain(x, targets)
    got = cam_engine.create("gradcam", inplace, ["norm"]).explain(x, targets)
    torch.testing.assert_close(got, expected)
    assert expected.amax() > 0
