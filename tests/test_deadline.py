"""The batch deadline reaches every loop of model evaluations (handlers.serving.deadline.watch, issue 25): a
forward pre-hook on the served model stops every cam_engine method between two of its model calls, without
cam_engine knowing of deadlines, and lets a run's first evaluation through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cam_engine
from cam_engine.targets import ClassifierOutputTarget
from handlers.serving import deadline


class Small(nn.Module):
    """A small CNN: 64 channels at ``layer`` (ScoreCAM's 64 masked inputs are 4 chunks of 16), 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.layer = nn.Sequential(nn.Conv2d(16, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.stem(x)))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    model = Small().eval()
    deadline.watch(model)
    deadline.watch(
        model
    )  # once per model: hooked twice, a run's first evaluation would count twice and raise
    return model


def counted(model: nn.Module) -> tuple[list[int], object]:
    """``[evaluations of model that ran to their end]`` and the hook's handle."""
    calls = [0]

    def count(module: nn.Module, args: object, output: object) -> None:
        calls[0] += 1

    return calls, model.register_forward_hook(count)


def run(model: nn.Module, name: str, due: deadline.Deadline | None) -> int:
    """Model evaluations of one explanation of one image with ``name`` under ``due``."""
    cam = cam_engine.create(name, model, [model.layer])
    calls, handle = counted(model)
    try:
        with deadline.active(due):
            cam.run(torch.rand(1, 3, 64, 64), [[ClassifierOutputTarget(3)]])
    finally:
        handle.remove()
    return calls[0]


@pytest.mark.parametrize("name", cam_engine.methods())
def test_every_method_stops_at_its_second_model_call_once_the_deadline_has_passed(model, name) -> None:
    """A property of every registered method, present and future: past the deadline a method either finishes on
    its one free evaluation or raises DeadlineExceeded at its second; with time left it runs to the end."""
    free = run(model, name, deadline.Deadline.after(60))
    try:
        calls = run(model, name, deadline.Deadline.after(-1))
    except deadline.DeadlineExceeded as error:
        assert error.code == 503 and error.kind == "DeadlineExceeded"
        assert free >= 2  # only a method that calls the model more than once is stopped
    else:
        assert calls == free <= 1, (name, calls, free)


@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
def test_the_perturbation_loops_run_many_passes_and_stop_after_one(model, name) -> None:
    assert run(model, name, None) >= 4  # capture (and probe) and 2-4 chunks of 64 channels without a deadline
    calls, handle = counted(model)
    try:
        with deadline.active(deadline.Deadline.after(-1)), pytest.raises(deadline.DeadlineExceeded):
            cam_engine.create(name, model, [model.layer]).run(
                torch.rand(2, 3, 64, 64), [[ClassifierOutputTarget(1)], [ClassifierOutputTarget(2)]]
            )
    finally:
        handle.remove()
    assert calls[0] == 1  # the free first one; the hook refused the next before it ran


def test_the_first_evaluation_of_each_run_is_free_and_outside_a_run_nothing_is_checked(model) -> None:
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        model(x), model(x)  # no run: no deadline
        for _ in range(2):  # each run starts its own count
            with deadline.active(deadline.Deadline.after(-1)):
                model(x)
                with pytest.raises(deadline.DeadlineExceeded):
                    model(x)
        with deadline.active(deadline.Deadline.after(60)):
            for _ in range(3):
                model(x)
