"""Cost budgets: what one request, and one batch, may ask the worker to compute, in forward-pass equivalents.

A *pass* is one image through the model with the backward pass a gradient method needs: what Grad-CAM
costs per explained target. Each method declares its cost per explained target as a function of its
options (:func:`passes_per_target`):

- cam_engine CAMs: 1 (Grad-CAM and the other gradient methods, EigenCAM, FEM, KPCA-CAM, ...); ScoreCAM
  and AblationCAM: one masked or ablated pass per channel of the target layers (``C``; AblationCAM
  ``C x ratio_channels_to_ablate``); ``aug_smooth`` x6 (grad-cam's six augmentations), ``eigen_smooth``
  nothing extra;
- Captum attributions (:meth:`handlers.serving.attributions.CaptumMethod.passes`): IG and layer IG
  ``n_steps``, occlusion its number of windows, guided Grad-CAM 1; each x ``nt_samples`` with
  ``noise_tunnel``.

A request costs its method's passes per target times its targets (0 when it is not explained). Before
any compute, :func:`admit` (one call from :func:`handlers.serving.batch.answer_units`):

- refuses a request costing over ``handler.max_passes_per_request``: 400 ``CostBudget`` naming the limit
  and the request's cost;
- admits requests in batch order while the batch's total fits in what the model's ``responseTimeout``
  allows (:data:`handlers.serving.deadline.SHARE` of it) at the measured seconds per pass; a request
  that would push it over gets 429 ``BatchCostBudget`` (alone, or in a quieter batch, it may fit). The
  first request of a batch is always admitted, so an estimate that is too high (a slow first run) can
  never refuse a request forever: the deadline stops it if the estimate was right;
- sets the batch's deadline (:mod:`handlers.serving.deadline`), the backstop where the estimate was low:
  :func:`for_handler` has the model's evaluations watch it (:func:`handlers.serving.deadline.watch`), so any
  loop of model calls (ScoreCAM, AblationCAM, Captum) stops at it with a 503 for its run's requests.

Seconds per pass: the load-time warm-up (one explanation with the default method) gives the first
estimate (:func:`for_handler`), then a running estimate over the explained runs (:meth:`CostModel.observe`,
an exponential average).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from handlers.serving import deadline
from handlers.serving.attributions import AttributionOptions, CaptumMethod
from handlers.serving.errors import RequestError

__all__ = ["PER_CHANNEL", "AUG_SMOOTH", "CostModel", "CostedHandler", "for_handler", "request_passes", "passes_per_target", "layer_channels", "admit"]

#: cam_engine methods that run one pass per channel of the target layers
PER_CHANNEL = ("scorecam", "ablationcam")
#: the passes ``aug_smooth`` multiplies a CAM by (grad-cam's test-time augmentations)
AUG_SMOOTH = 6
#: the weight of the newest run in the running estimate of seconds per pass
SMOOTHING = 0.3
#: TorchServe's default ``responseTimeout`` (seconds), where a model's config sets none
DEFAULT_RESPONSE_TIMEOUT = 120


class CostedHandler(Protocol):
    """What the budgets read of a loaded handler (:class:`handlers.serving.base.CamHandler` is one)."""

    config: Any  # handlers.config.HandlerConfig
    device: torch.device

    @property
    def cams(self) -> Mapping[str, Any]: ...

    @property
    def costs(self) -> CostModel: ...

    @property
    def model(self) -> nn.Module: ...

    def target_count(self, request: Any) -> int: ...

    def warm_up_targets(self) -> list[Any]: ...


def passes_per_target(
    method: Any, name: str, options: AttributionOptions | None, aug_smooth: bool, channels: int
) -> int:
    """Forward-pass equivalents of explaining one target of one image with ``method`` (registry ``name``);
    ``channels``: of the target layers (summed), for the per-channel methods."""
    if isinstance(method, CaptumMethod):
        return method.passes(options or method.defaults())
    per = 1
    if name in PER_CHANNEL:
        ratio = float(getattr(method, "ratio_channels_to_ablate", 1.0)) if name == "ablationcam" else 1.0
        per = max(1, math.ceil(channels * ratio))
    return per * (AUG_SMOOTH if aug_smooth else 1)


def layer_channels(model: nn.Module, layers: Iterable[nn.Module], x: torch.Tensor, reshape: Any = None) -> int:
    """The channels of ``layers``' outputs for input ``x`` (summed; after ``reshape``, as a CAM sees them)."""
    found: list[int] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            found.append(int((reshape(output) if reshape else output).shape[1]))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return sum(found)


@dataclass
class CostModel:
    """One model's cost limits and its running estimate of seconds per pass."""

    max_passes_per_request: int
    response_timeout: float  # seconds
    seconds_per_pass: float
    channels: int = 0  # of the target layers, for the per-channel methods
    batch_deadline: deadline.Deadline | None = None  # the current batch's, set by admit()

    def observe(self, passes: int, seconds: float) -> None:
        """A run of ``passes`` took ``seconds``: update the running estimate."""
        if passes > 0 and seconds > 0:
            self.seconds_per_pass += SMOOTHING * (seconds / passes - self.seconds_per_pass)

    @property
    def batch_passes(self) -> int:
        """The passes one batch may run within its share of ``responseTimeout``."""
        return int(self.response_timeout * deadline.SHARE / max(self.seconds_per_pass, 1e-9))


def response_timeout(yaml_config: Mapping[str, Any] | None) -> float:
    """The model's ``responseTimeout`` (seconds) from its model-config.yaml, else TorchServe's default."""
    value = (yaml_config or {}).get("responseTimeout", DEFAULT_RESPONSE_TIMEOUT)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else DEFAULT_RESPONSE_TIMEOUT


def request_passes(handler: CostedHandler, request: Any) -> int:
    """Forward-pass equivalents ``request`` (a :class:`handlers.serving.base.ParsedRequest`) costs ``handler``."""
    if not request.explain:
        return 0
    method = handler.cams[request.method]
    per = passes_per_target(method, request.method, request.method_options, request.aug_smooth, handler.costs.channels)
    return per * handler.target_count(request)


def admit(handler: CostedHandler, requests: list[Any], answers: list[Any]) -> list[Any]:
    """The requests of the batch that the cost budgets admit (see the module doc); each refused one gets its
    ``(status, error body)`` in ``answers`` at its position. Sets the batch's deadline."""
    costs: CostModel = handler.costs
    budget, admitted = costs.batch_passes, 0
    kept: list[Any] = []
    for request in requests:
        passes = request_passes(handler, request)
        if passes > costs.max_passes_per_request:
            error = RequestError(
                f"this request costs {passes} forward-pass equivalents ({request.method}), over this model's "
                f"handler.max_passes_per_request of {costs.max_passes_per_request}: ask for fewer targets, n_steps, "
                "nt_samples or occlusion windows",
                400,
                "CostBudget",
            )
        elif kept and admitted + passes > budget:  # the first one always runs: the deadline is its backstop
            error = RequestError(
                f"this request's {passes} forward-pass equivalents do not fit the batch's remaining budget "
                f"({budget} - {admitted} already admitted: what fits in {deadline.SHARE:g} x responseTimeout "
                f"{costs.response_timeout:g} s at {costs.seconds_per_pass * 1000:.3g} ms per pass): retry it",
                429,
                "BatchCostBudget",
            )
        else:
            admitted += passes
            kept.append(request)
            continue
        answers[request.index] = (error.code, error.body())
    costs.batch_deadline = deadline.Deadline.after(costs.response_timeout * deadline.SHARE)
    return kept


def for_handler(handler: CostedHandler, yaml_config: Mapping[str, Any] | None, warm_up_seconds: float) -> CostModel:
    """The cost model of a loaded handler: its limits, its target layers' channels (where a per-channel method
    is served) and, as the first estimate of seconds per pass, the time its load-time warm-up took (one
    explanation of a blank image with the default method: an overestimate, as a first run is slow, which
    the running estimate corrects from the first explained batches on). From here on the handler's model
    checks the batch deadline at each evaluation (:func:`handlers.serving.deadline.watch`)."""
    from handlers.serving.attributions import method_name

    channels = 0
    per_channel = [handler.cams[name] for name in PER_CHANNEL if name in handler.cams]
    if per_channel:
        x = torch.zeros((1, 3, *handler.config.preprocessing.input_size), device=handler.device)
        cam = per_channel[0]
        channels = layer_channels(handler.model, cam.target_layers, x, getattr(cam, "reshape_transform", None))
    default = method_name(handler.config.explanation.default_method)
    passes = passes_per_target(handler.cams[default], default, None, False, channels) * max(len(handler.warm_up_targets()), 1)
    deadline.watch(handler.model)
    return CostModel(handler.config.max_passes_per_request, response_timeout(yaml_config), warm_up_seconds / passes, channels)
