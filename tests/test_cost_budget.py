"""Cost budgets in forward-pass equivalents (issue 25 item 2): each method's declared cost, the per-request
limit (400 before any compute), the batch's share of responseTimeout (429 for what does not fit), and the
deadline that stops a Captum loop with a 503 for its request while the worker keeps serving; the issue's
IG + noise-tunnel request refused by the shipped default model, in-process and through the real TorchServe."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

from handlers.serving import attributions, cost, deadline
from handlers.serving.attributions import AttributionOptions
from handlers.serving.base import COMMON_OPTIONS
from handlers.tasks.classifier import ClassifierHandler
from tests.helpers.fake_context import FakeContext
from tests.helpers.inputs import b64, encode, square_image
from tests.helpers.serving import BUDGET_MODEL, DEFAULT_MODEL

SHIPPED = yaml.safe_load((Path(__file__).parents[1] / "model_store/configs/efficientnet_lite0.yaml").read_text())
LABELS = [f"class_{i}" for i in range(10)]
PHOTO = b64(encode(square_image(64, 64, (10, 12, 40, 44))))
#: the request of issue 25 that ran past responseTimeout and killed the worker: all within the per-option maxima
ISSUE_REQUEST = {"method": "integrated_gradients", "n_steps": 64, "noise_tunnel": True, "nt_samples": 16}


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> ClassifierHandler:
    """ResNet-18 at 64x64 with the shipped default model's Captum limits and max_passes_per_request."""
    directory = tmp_path_factory.mktemp("cost")
    shipped = SHIPPED["handler"]
    config = {
        "responseTimeout": 120,
        "handler": {
            "architecture": "resnet18", "labels": LABELS, "target_layers": ["layer4.-1"], "aug_smooth": True,
            "preprocessing": {"input_size": [64, 64]}, "attributions": shipped["attributions"],
            "max_passes_per_request": shipped["max_passes_per_request"],
            "methods": ["gradcam", "eigencam", "scorecam", "ablationcam", *attributions.METHODS],
        },
    }  # fmt: skip
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    instance = ClassifierHandler()
    instance.initialize(FakeContext(directory, "cost"))
    return instance


def call(handler: ClassifierHandler, *bodies: dict) -> list[tuple[int, dict]]:
    context = FakeContext(Path(handler.context.system_properties["model_dir"]), "cost", [True] * len(bodies))
    answers = [json.loads(a) for a in handler.handle([{"body": b} for b in bodies], context)]
    return [(context.status.get(i, (200, ""))[0], a) for i, a in enumerate(answers)]


@pytest.fixture
def estimate(handler: ClassifierHandler):
    """Sets the handler's responseTimeout and seconds per pass for one test (restored after)."""
    saved = (handler.costs.response_timeout, handler.costs.seconds_per_pass)

    def set_to(response_timeout: float, seconds_per_pass: float) -> None:
        handler.costs.response_timeout, handler.costs.seconds_per_pass = response_timeout, seconds_per_pass

    yield set_to
    handler.costs.response_timeout, handler.costs.seconds_per_pass = saved


# ---------------------------------------------------------------------------------------------- cost formulas
def test_cam_costs_one_pass_per_target_and_per_channel_methods_one_per_channel(handler) -> None:
    costs, cams = handler.costs, handler.cams
    assert costs.channels == handler.model.fc.in_features == 512  # layer4's output channels, measured by a hook
    assert cost.passes_per_target(cams["gradcam"], "gradcam", None, False, costs.channels) == 1
    assert cost.passes_per_target(cams["gradcam"], "gradcam", None, True, costs.channels) == 6  # aug_smooth
    assert cost.passes_per_target(cams["eigencam"], "eigencam", None, False, costs.channels) == 1
    assert cost.passes_per_target(cams["scorecam"], "scorecam", None, False, costs.channels) == 512
    assert cost.passes_per_target(cams["ablationcam"], "ablationcam", None, True, costs.channels) == 512 * 6
    cams["ablationcam"].ratio_channels_to_ablate = 0.3
    try:
        assert cost.passes_per_target(cams["ablationcam"], "ablationcam", None, False, 512) == math.ceil(512 * 0.3)
    finally:
        cams["ablationcam"].ratio_channels_to_ablate = 1.0


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        ("integrated_gradients", {"n_steps": 20}, 20),
        ("integrated_gradients", {"n_steps": 20, "noise_tunnel": True, "nt_samples": 4}, 80),
        ("layer_integrated_gradients", {"n_steps": 7, "noise_tunnel": True, "nt_samples": 3}, 21),
        ("occlusion", {"window": 16, "stride": 8}, ((64 - 16) // 8 + 1) ** 2),  # 49 windows on 64x64
        ("occlusion", {"window": 32, "stride": 16, "noise_tunnel": True, "nt_samples": 2}, 2 * ((64 - 32) // 16 + 1) ** 2),
        ("guided_gradcam", {"noise_tunnel": True, "nt_samples": 5}, 5),
    ],
)
def test_captum_costs_follow_their_options(handler, method, options, expected) -> None:
    parsed = attributions.parse_options(handler.cams[method], options, smoothing=False)
    assert cost.passes_per_target(handler.cams[method], method, parsed, False, 512) == expected


def test_a_request_costs_its_passes_times_its_targets(handler, estimate) -> None:
    estimate(120, 1e-9)
    body = {"image": PHOTO, "method": "integrated_gradients", "n_steps": 10, "targets": [1, 2, 3]}
    request = handler.parse_request(0, {"body": body}, True)
    assert cost.request_passes(handler, request) == 30
    unexplained = handler.parse_request(0, {"body": {"image": PHOTO, "method": "scorecam"}}, False)
    assert cost.request_passes(handler, unexplained) == 0  # a prediction only: no explanation pass


def test_options_are_the_fields_of_the_option_dataclasses() -> None:
    assert set(AttributionOptions.__dataclass_fields__) <= set(COMMON_OPTIONS)
    assert {"explain", "method", "aug_smooth", "eigen_smooth", "output", "colormap", "alpha", "heatmap_format"} <= set(COMMON_OPTIONS)


# ---------------------------------------------------------------------------------------------- per request: 400
def test_the_issue_request_is_refused_in_milliseconds_naming_the_limit_and_its_cost(handler) -> None:
    start = time.perf_counter()
    [(status, answer)] = call(handler, {"image": PHOTO, **ISSUE_REQUEST})
    elapsed = time.perf_counter() - start
    limit = SHIPPED["handler"]["max_passes_per_request"]
    assert status == 400 and answer["type"] == "CostBudget", answer
    assert f"costs {64 * 16} forward-pass equivalents" in answer["message"]
    assert f"handler.max_passes_per_request of {limit}" in answer["message"]
    assert elapsed < 0.5, elapsed  # refused before any model pass (1,024 of them take minutes on a CPU)


def test_several_targets_add_up_to_the_request_limit(handler) -> None:
    limit = handler.config.max_passes_per_request
    steps = limit // 5 + 1  # one target fits, five do not
    [(alone, _), (five, answer)] = call(
        handler,
        {"image": PHOTO, "method": "integrated_gradients", "n_steps": 2, "targets": [1]},
        {"image": PHOTO, "method": "integrated_gradients", "n_steps": steps, "targets": [0, 1, 2, 3, 4]},
    )
    assert alone == 200
    assert five == 400 and answer["type"] == "CostBudget" and f"costs {5 * steps} forward-pass" in answer["message"]


# ---------------------------------------------------------------------------------------------- per batch: 429
def test_a_batch_keeps_what_fits_in_the_response_timeout_and_refuses_the_rest_429(handler, estimate) -> None:
    estimate(1.0, deadline.SHARE / 20)  # 20 passes fit in this batch's share of a 1 s responseTimeout
    assert handler.costs.batch_passes == 20
    ig = {"image": PHOTO, "method": "integrated_gradients", "n_steps": 8, "targets": [3]}
    answers = call(handler, ig, dict(ig, targets=[4]), dict(ig, targets=[5]), {"image": PHOTO, "method": "gradcam"})
    assert [status for status, _ in answers] == [200, 200, 429, 200]  # 8 + 8 fit, 8 more do not, 1 more does
    refused = answers[2][1]
    assert refused["type"] == "BatchCostBudget"
    assert "batch's remaining budget (20 - 16 already admitted" in refused["message"] and "responseTimeout 1 s" in refused["message"]
    estimate(1.0, deadline.SHARE / 20)  # (the batch's run updated the running estimate)
    [(alone, _)] = call(handler, dict(ig, targets=[5]))  # alone it fits: the 429 is worth retrying
    assert alone == 200
    estimate(1.0, 1.0)  # an estimate far too high (a slow first run): nothing fits in the batch's share...
    answers = call(handler, dict(ig, targets=[6]), {"image": PHOTO, "method": "gradcam"})
    assert [status for status, _ in answers] == [200, 429]  # ...yet the first request runs and corrects it
    assert handler.costs.seconds_per_pass < 1.0


def test_the_response_timeout_comes_from_the_model_config(handler) -> None:
    assert cost.response_timeout({"responseTimeout": 7}) == 7.0
    assert cost.response_timeout({}) == cost.DEFAULT_RESPONSE_TIMEOUT == 120
    assert handler.costs.response_timeout == 120  # this fixture's model-config.yaml
    assert 0 < handler.costs.seconds_per_pass < 5  # timed at load on the default method


# ---------------------------------------------------------------------------------------------- deadline: 503
def test_a_captum_loop_past_its_deadline_answers_503_and_the_worker_goes_on(handler, estimate) -> None:
    estimate(0.1, 1e-9)  # the estimate admits anything; the deadline (0.08 s) is the backstop
    slow = {"image": PHOTO, "method": "integrated_gradients", "n_steps": 64, "internal_batch_size": 1, "targets": [2]}
    start = time.perf_counter()
    [(status, answer), (mate, mate_answer)] = call(handler, slow, {"image": PHOTO, "method": "gradcam"})
    elapsed = time.perf_counter() - start
    assert status == 503 and answer["type"] == "DeadlineExceeded", answer
    assert "0.08 s share of the model's responseTimeout" in answer["message"]
    assert mate == 200 and mate_answer["explanations"][0]["method"] == "gradcam"  # its batch-mate is answered
    assert elapsed < 5, elapsed
    estimate(120, 1e-9)
    [(again, _)] = call(handler, dict(slow, n_steps=4))  # the same handler serves the next batch
    assert again == 200


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
@pytest.mark.parametrize("slow_first", [True, False])
def test_a_cam_engine_loop_past_its_deadline_answers_503_and_its_cheap_batch_mate_200(
    handler, estimate, monkeypatch, method, slow_first
) -> None:
    """ScoreCAM/AblationCAM (512 channels of layer4: 32 or 16 chunks) under a deadline that has passed before the
    batch runs: stopped after its run's first model evaluation (handlers.serving.deadline.watch), while the Grad-CAM
    batch-mate is answered, whichever of the two runs first."""
    estimate(1e-6, 1e-9)  # the estimate admits anything; the deadline is over at once
    monkeypatch.setattr(handler.costs, "max_passes_per_request", 512)  # one pass per channel
    slow, cheap = {"image": PHOTO, "method": method, "targets": [2]}, {"image": PHOTO, "method": "gradcam"}
    evaluations = [0]
    handle = handler.model.register_forward_hook(lambda *args: evaluations.__setitem__(0, evaluations[0] + 1))
    try:
        answers = call(handler, slow, cheap) if slow_first else call(handler, cheap, slow)
    finally:
        handle.remove()
    (status, answer), (mate, mate_answer) = answers if slow_first else answers[::-1]
    assert status == 503 and answer["type"] == "DeadlineExceeded", answer
    assert "8e-07 s share of the model's responseTimeout" in answer["message"]  # 0.8 x 1e-6
    assert mate == 200 and mate_answer["explanations"][0]["method"] == "gradcam", mate_answer
    assert evaluations[0] <= 4, evaluations  # each run's free one and the stopped run's prediction, not 17-33 passes
    estimate(120, 1e-9)
    [(again, body)] = call(handler, slow)  # with time left the same handler runs the whole loop
    assert again == 200 and body["explanations"][0]["method"] == method


def test_no_deadline_outside_a_batch() -> None:
    assert deadline.remaining() is None
    deadline.check()  # no deadline set: nothing raised
    with deadline.active(deadline.Deadline.after(-1)), pytest.raises(deadline.DeadlineExceeded):
        deadline.check()
    assert deadline.remaining() is None


# ---------------------------------------------------------------------------------------------- real TorchServe
def test_the_shipped_default_model_refuses_the_issue_request_through_torchserve(server) -> None:
    body = {"image": PHOTO, **ISSUE_REQUEST}
    start = time.perf_counter()
    answer = requests.post(f"{server.url()}/explanations/{DEFAULT_MODEL}", json=body, headers=server.headers(), timeout=60)
    elapsed = time.perf_counter() - start
    assert answer.status_code == 400, answer.text
    assert answer.json()["type"] == "CostBudget" and "costs 1024 forward-pass equivalents" in answer.json()["message"]
    assert elapsed < 2, elapsed  # milliseconds of handler time; the rest is HTTP and TorchServe's queue
    ping = requests.post(f"{server.url()}/predictions/{DEFAULT_MODEL}", json={"image": PHOTO}, headers=server.headers(), timeout=60)
    assert ping.status_code == 200, ping.text  # the worker is alive and serving


def test_a_batch_mate_that_does_not_fit_the_batch_is_refused_429_through_torchserve(server) -> None:
    """Two images of one KServe v1 request are one batch: the Grad-CAM runs, the 655,360-pass occlusion (4,096
    windows x 16 noise samples x 10 targets) cannot fit 0.8 x responseTimeout 5 s and is refused before any pass."""
    huge = {"image": PHOTO, "method": "occlusion", "window": 1, "stride": 1, "noise_tunnel": True, "nt_samples": 16,
            "targets": list(range(10))}  # fmt: skip
    body = {"instances": [{"image": PHOTO, "method": "gradcam"}, huge]}
    start = time.perf_counter()
    answer = requests.post(f"{server.url()}/v1/models/{BUDGET_MODEL}:explain", json=body, headers=server.headers(), timeout=60)
    elapsed = time.perf_counter() - start
    assert answer.status_code == 200, answer.text  # a v1 request with one answered image
    cheap, refused = answer.json()["explanations"]
    assert cheap["explanations"][0]["method"] == "gradcam", cheap
    assert refused["code"] == 429 and refused["type"] == "BatchCostBudget", refused
    assert "this request's 655360 forward-pass equivalents do not fit" in refused["message"]
    assert "responseTimeout 5 s" in refused["message"]
    assert elapsed < 5, elapsed  # refused, not run (the run alone would take minutes)
