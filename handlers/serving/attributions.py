"""Captum attributions served like CAM methods: ``integrated_gradients``, ``layer_integrated_gradients``,
``occlusion`` and ``guided_gradcam``, each optionally wrapped in Captum's ``NoiseTunnel`` (SmoothGrad).

The maths is Captum's own (``captum.attr``); this module only adapts it to the call shape the base
handler uses for cam_engine methods: ``method.run(batch, targets, options=...)`` returning an object with
``cams`` (``[N, H, W]`` in [0, 1] at the input grid, one row per (image, target) pair), ``raw`` (the same
rows, signed), ``pairs`` and ``outputs``.

- Targets: a cam_engine ``ClassifierOutputTarget(c)`` becomes Captum's ``target=c``; the handler's
  ``TopClassTarget`` the image's arg-max class (from one forward pass, which also gives the predictions).
  Only classifier configs may list these methods (a :class:`ConfigError` at load otherwise).
- Signed values: ``raw`` is the attribution summed over the colour channels (``integrated_gradients``,
  ``occlusion``, ``guided_gradcam``), or over the layer's channels and bilinearly upsampled to the input
  grid (``layer_integrated_gradients`` at the configured target layer). The PNG (``cams``) shows the
  positive part (evidence for the class) divided by its maximum per map; the signed values come back
  with ``heatmap_format: float16`` or ``npy``.
- Layer IG cost: Captum's ``LayerIntegratedGradients`` re-runs the whole network for each of its
  ``n_steps``. Where the target layer's output is the only path to the logits (checked once at load
  against Captum's class), Captum's ``IntegratedGradients`` runs over the layer's activations instead:
  the same integral for two passes up to the layer plus ``n_steps`` passes of the layers after it.
  With ``noise_tunnel``, or where the check fails, Captum's class serves.
- Request options (bounded by ``handler.attributions``, :class:`AttributionConfig`): ``n_steps``,
  ``baselines`` (``black``, ``blur``, ``uniform``), ``internal_batch_size``, ``window``/``stride``
  (occlusion), ``noise_tunnel`` (true: SmoothGrad with ``nt_samples`` noisy copies of standard
  deviation ``nt_stdev``, in normalised input units).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import cam_engine
from cam_engine.model_utils import model_scores
from handlers.config import ConfigError
from handlers.serving.errors import RequestError, quote
from handlers.serving.options import option_names, read_options
from handlers.settings import boolean, choice, integer, read_section, setting, unit
from handlers.tasks.targets import class_of

__all__ = [
    "METHODS",
    "OPTIONS",
    "BASELINES",
    "AttributionConfig",
    "AttributionOptions",
    "AttributionResult",
    "CaptumMethod",
    "is_attribution",
    "method_name",
    "build",
    "read_limits",
    "parse_options",
    "make_baselines",
]

logger = logging.getLogger(__name__)

METHODS = ("integrated_gradients", "layer_integrated_gradients", "occlusion", "guided_gradcam")
BASELINES = ("black", "blur", "uniform")
_STEPS = ("integrated_gradients", "layer_integrated_gradients")
_ONLY = {  # option -> the methods it applies to
    "n_steps": _STEPS,
    "baselines": _STEPS + ("occlusion",),
    "internal_batch_size": _STEPS + ("occlusion",),
    "window": ("occlusion",),
    "stride": ("occlusion",),
}


@dataclass(frozen=True)
class AttributionConfig:
    """``handler.attributions``: defaults and limits of the Captum methods (a request may not exceed a ``max_``).

    - ``n_steps`` (IG, layer IG; Captum's Gauss-Legendre rule), ``baselines``, ``internal_batch_size``
      (rows per model pass; occlusion's ``perturbations_per_eval``);
    - ``window``/``stride``: occlusion's square patch and step in input pixels; ``max_windows``: the most
      patch positions per image;
    - ``nt_samples``/``nt_stdev``: NoiseTunnel's noisy copies and their standard deviation;
    - ``max_passes``: the most model evaluations per explained target (steps or windows x noise samples).
    """

    n_steps: int = setting(15, integer(1))
    max_n_steps: int = setting(64, integer(1))
    baselines: str = setting("black", choice(*BASELINES))
    internal_batch_size: int = setting(16, integer(1))
    max_internal_batch_size: int = setting(64, integer(1))
    window: int = setting(16, integer(1))
    stride: int = setting(8, integer(1))
    max_windows: int = setting(1024, integer(1))
    nt_samples: int = setting(8, integer(1))
    max_nt_samples: int = setting(16, integer(1))
    nt_stdev: float = setting(0.1, unit)
    max_passes: int = setting(1024, integer(1))
    noise_tunnel: bool = setting(False, boolean)

    def finish(self, where: str, data: Mapping[str, Any]) -> AttributionConfig:
        for key in ("n_steps", "internal_batch_size", "nt_samples"):
            if getattr(self, key) > getattr(self, f"max_{key}"):
                raise ConfigError(f"{where}.{key}: {getattr(self, key)} is over max_{key} {getattr(self, f'max_{key}')}")
        return self


@dataclass(frozen=True)
class AttributionOptions:
    """One request's Captum options (hashable: batches group by it), read by
    :func:`handlers.serving.options.read_options`: defaults and maxima from :class:`AttributionConfig`
    (``default_from``/``limit``); ``window``/``stride`` at most the input side (``stride`` not given: the
    configured stride, at most ``window``)."""

    n_steps: int = setting(15, integer(1), default_from="n_steps", limit="max_n_steps")
    baselines: str = setting("black", choice(*BASELINES), default_from="baselines")
    internal_batch_size: int = setting(16, integer(1), default_from="internal_batch_size", limit="max_internal_batch_size")
    window: int = setting(16, integer(1), default_from="window", limit="side")
    stride: int = setting(8, integer(1), default_from="stride", limit="side")
    noise_tunnel: bool = setting(False, boolean, default_from="noise_tunnel")
    nt_samples: int = setting(8, integer(1), default_from="nt_samples", limit="max_nt_samples")


OPTIONS = option_names(AttributionOptions)


@dataclass
class AttributionResult:
    """What :meth:`CaptumMethod.run` returns: ``cams`` ``[N, H, W]`` in [0, 1], ``raw`` ``[N, H, W]`` signed,
    ``pairs`` (image, target) per row (image-major), ``outputs`` the model's output, ``targets`` per image."""

    cams: torch.Tensor
    raw: torch.Tensor
    pairs: list[tuple[int, int]]
    outputs: Any
    targets: list[list[Any]]


def is_attribution(name: str) -> bool:
    """Whether ``name`` (any case) is one of the Captum :data:`METHODS`."""
    return isinstance(name, str) and name.lower() in METHODS


def method_name(name: str) -> str:
    """The registry name of a method: a Captum method's lowercase name, else cam_engine's (or ``name.lower()``)."""
    if is_attribution(name):
        return name.lower()
    try:
        return cam_engine.get_method(name).name
    except ValueError:
        return name.lower()


def windows(size: tuple[int, int], window: int, stride: int) -> int:
    """Occlusion patch positions on an input of ``size`` ``(H, W)`` (Captum's count)."""
    return ((size[0] - window) // stride + 1) * ((size[1] - window) // stride + 1)


class _Stop(Exception):
    """Raised by a hook to end a forward pass at the target layer."""


class _Scores(nn.Module):
    """The model with its logits as the output (Captum's forward function and GuidedGradCam's module)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return model_scores(self.model(x))


def make_baselines(kind: str, x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Baselines for normalised inputs ``x`` ``[N, 3, H, W]``: ``black`` (pixel 0 normalised), ``blur``
    (Gaussian blur of ``x``, sigma = min(H, W) / 16) or ``uniform`` (pixels uniform in [0, 1), seed 0)."""
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    if kind == "black":
        return ((0 - mean_t) / std_t).expand_as(x).contiguous()
    if kind == "uniform":
        generator = torch.Generator(device="cpu").manual_seed(0)
        pixels = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return (pixels - mean_t) / std_t
    if kind == "blur":
        from torchvision.transforms.functional import gaussian_blur

        sigma = min(x.shape[-2:]) / 16
        kernel = min(2 * int(2 * sigma) + 1, 2 * (min(x.shape[-2:]) // 2) - 1)
        return gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    raise ValueError(f"baselines must be one of {', '.join(BASELINES)}, got {quote(kind)}")


class CaptumMethod:
    """A Captum attribution bound to a model (and, for the layer methods, the configured target layer)."""

    def __init__(self, name: str, model: nn.Module, layer: nn.Module, config: AttributionConfig, preprocessing: Any) -> None:
        from captum import attr

        self.name = name
        self.config = config
        self.input_size = tuple(preprocessing.input_size)
        self.mean, self.std = tuple(preprocessing.mean), tuple(preprocessing.std)
        self.scores = _Scores(model)
        self.layer = layer
        self.algorithm = {
            "integrated_gradients": lambda: attr.IntegratedGradients(self.scores),
            "layer_integrated_gradients": lambda: attr.LayerIntegratedGradients(self.scores, layer),
            "occlusion": lambda: attr.Occlusion(self.scores),
            "guided_gradcam": lambda: attr.GuidedGradCam(self.scores, layer),
        }[name]()
        self.noise_tunnel = attr.NoiseTunnel(self.algorithm)
        self._head_input: torch.Tensor | None = None
        self.tail_ig = attr.IntegratedGradients(self._tail) if name == "layer_integrated_gradients" else None
        self.truncated = False
        if self.tail_ig is not None:
            self.truncated = self._truncation_agrees()

    # ------------------------------------------------------------------ layer IG on the tail only
    def _activations(self, x: torch.Tensor) -> torch.Tensor:
        """The target layer's output for ``x`` (the forward stops there)."""
        found: list[torch.Tensor] = []

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            found.append(output)
            raise _Stop

        handle = self.layer.register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.scores(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not found or not isinstance(found[0], torch.Tensor):
            raise TypeError("the target layer does not output one tensor")
        return found[0]

    def _tail(self, scaled: torch.Tensor) -> torch.Tensor:
        """The logits with the target layer's output replaced by ``scaled`` ``[M, ...]``: the layers before it
        run on one image only (their output is discarded), the layers after it on the ``M`` rows."""
        handle = self.layer.register_forward_hook(lambda module, args, output: scaled)
        try:
            return self.scores(self._head_input)
        finally:
            handle.remove()

    def _layer_ig(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Captum's IntegratedGradients over the target layer's activations, from those of the baselines to
        those of ``x``: the same integral as Captum's LayerIntegratedGradients, which re-runs the whole
        network for every step, at the cost of two passes to the layer and ``n_steps`` tail passes."""
        baselines = kwargs.pop("baselines")
        self._head_input = x[:1]
        try:
            return self.tail_ig.attribute(self._activations(x), baselines=self._activations(baselines), **kwargs)
        finally:
            self._head_input = None

    def _truncation_agrees(self) -> bool:
        """Whether the tail-only layer IG equals Captum's LayerIntegratedGradients on this model (not when a
        skip connection bypasses the target layer): checked once on two random images."""
        generator = torch.Generator(device="cpu").manual_seed(0)
        device = next(self.scores.parameters()).device
        x = torch.randn((2, 3, *self.input_size), generator=generator).to(device)
        with torch.no_grad():
            classes = self.scores(x).argmax(dim=1)
        kwargs = {"target": classes, "n_steps": 2, "baselines": torch.zeros_like(x)}
        try:
            expected = self.algorithm.attribute(x, **kwargs).detach()
            got = self._layer_ig(x, dict(kwargs)).detach()
        except Exception as error:  # noqa: BLE001 - Captum's own class then serves
            logger.info("layer IG at full passes (tail-only failed: %s: %s)", type(error).__name__, error)
            return False
        agrees = got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-3, atol=1e-5 * float(expected.abs().max()))
        logger.info("layer IG: %s", "tail passes only" if agrees else "full passes (tail-only differs on this model)")
        return agrees

    def defaults(self) -> AttributionOptions:
        """The options a request gets when it gives none."""
        c = self.config
        return AttributionOptions(c.n_steps, c.baselines, c.internal_batch_size, c.window, c.stride, c.noise_tunnel, c.nt_samples)

    def passes(self, options: AttributionOptions) -> int:
        """Model evaluations per explained target (steps or windows, times noise samples)."""
        if self.name in _STEPS:
            per = options.n_steps
        elif self.name == "occlusion":
            per = windows(self.input_size, options.window, options.stride)
        else:
            per = 1
        return per * (options.nt_samples if options.noise_tunnel else 1)

    def arguments(self, x: torch.Tensor, classes: torch.Tensor, options: AttributionOptions) -> dict[str, Any]:
        """The keyword arguments of Captum's ``attribute`` for inputs ``x`` ``[N, 3, H, W]``."""
        kwargs: dict[str, Any] = {"target": classes}
        if self.name in _STEPS:
            kwargs.update(n_steps=options.n_steps, internal_batch_size=options.internal_batch_size)
        if self.name == "occlusion":
            kwargs.update(
                sliding_window_shapes=(x.shape[1], options.window, options.window),
                strides=(x.shape[1], options.stride, options.stride),
                perturbations_per_eval=options.internal_batch_size,
            )
        if self.name in _ONLY["baselines"]:
            kwargs["baselines"] = make_baselines(options.baselines, x, self.mean, self.std)
        return kwargs

    def attribute(self, x: torch.Tensor, classes: torch.Tensor, options: AttributionOptions) -> torch.Tensor:
        """Captum's attribution for rows ``x`` ``[N, 3, H, W]`` and ``classes`` ``[N]``, reduced to a signed map
        ``[N, H, W]`` at the input grid (channels summed; a layer's map bilinearly upsampled)."""
        kwargs = self.arguments(x, classes, options)
        with warnings.catch_warnings():  # Captum's notes on setting requires_grad and ReLU hooks, per call
            warnings.simplefilter("ignore", UserWarning)
            attribution = self._attribute(x, options, kwargs)
        summed = attribution.detach().float().sum(dim=1)
        if tuple(summed.shape[-2:]) != tuple(x.shape[-2:]):
            from captum.attr import LayerAttribution

            summed = LayerAttribution.interpolate(summed[:, None], tuple(x.shape[-2:]), "bilinear")[:, 0]
        return summed

    def _attribute(self, x: torch.Tensor, options: AttributionOptions, kwargs: dict[str, Any]) -> torch.Tensor:
        if self.truncated and not options.noise_tunnel:
            return self._layer_ig(x, kwargs)
        if options.noise_tunnel:
            return self.noise_tunnel.attribute(
                x, nt_type="smoothgrad", nt_samples=options.nt_samples, stdevs=self.config.nt_stdev,
                nt_samples_batch_size=1, **kwargs,
            )
        return self.algorithm.attribute(x, **kwargs)

    def run(self, batch: torch.Tensor, targets: list[list[Any]], aug_smooth: bool = False, eigen_smooth: bool = False,
            options: AttributionOptions | None = None) -> AttributionResult:
        """Attributions for every (image, target) pair of ``batch`` ``[B, 3, H, W]`` (``targets`` per image)."""
        options = options or self.defaults()
        with torch.no_grad():
            outputs = self.scores.model(batch)
        scores = model_scores(outputs)
        pairs, classes = [], []
        for image, image_targets in enumerate(targets):
            for position, target in enumerate(image_targets):
                category = class_of(target, scores, image)
                if category is None:
                    raise ValueError(f"{self.name} explains class targets only, got {quote(target)}")
                pairs.append((image, position))
                classes.append(int(category))
        if not pairs:
            empty = batch.new_zeros((0, *batch.shape[-2:]))
            return AttributionResult(empty, empty, [], outputs, targets)
        rows = batch[[image for image, _ in pairs]].contiguous()
        raw = self.attribute(rows, torch.tensor(classes, device=batch.device), options)
        positive = raw.clamp_min(0)
        cams = positive / positive.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
        return AttributionResult(cams, raw, pairs, outputs, targets)


def build(config: Any, model: nn.Module, name: str, layers: list[nn.Module]) -> CaptumMethod:
    """The Captum method ``name`` for ``model`` under ``config`` (a :class:`handlers.config.HandlerConfig`);
    :class:`ConfigError` when the config cannot serve it."""
    if config.task != "classifier" or config.architecture == "clip":
        raise ConfigError(
            f"handler.methods: {name} is a Captum attribution, served for classifier configs only "
            f"(this config: task {config.task}, architecture {config.architecture})"
        )
    if name in ("layer_integrated_gradients", "guided_gradcam") and len(layers) != 1:
        raise ConfigError(f"handler.target_layers: {name} explains one layer, {len(layers)} are configured")
    return CaptumMethod(name, model, layers[0], read_limits(config), config.preprocessing)


def read_limits(config: Any) -> AttributionConfig:
    """The validated ``handler.attributions`` of a :class:`handlers.config.HandlerConfig` (:class:`ConfigError`)."""
    return read_section(AttributionConfig, dict(config.explanation.attributions), "handler.attributions")


def parse_options(method: Any, options: Mapping[str, Any], smoothing: bool) -> AttributionOptions | None:
    """A request's Captum options for ``method`` (None for a cam_engine method, which takes none of them).

    ``smoothing``: the request asked for aug_smooth or eigen_smooth (CAM-only options). Raises
    :class:`RequestError` naming the option and the limit it exceeds.
    """
    given = [key for key in OPTIONS if key in options]
    if not isinstance(method, CaptumMethod):
        if given:
            raise RequestError(f"option(s) {', '.join(given)} apply to the Captum methods only ({', '.join(METHODS)})")
        return None
    if smoothing:
        raise RequestError(f"aug_smooth and eigen_smooth apply to CAM methods, not {method.name}; use noise_tunnel")
    for key in given:
        if key in _ONLY and method.name not in _ONLY[key]:
            raise RequestError(f"{key} applies to {', '.join(_ONLY[key])}, not {method.name}")
    c, side = method.config, min(method.input_size)
    limits = {name: (getattr(c, name), f"handler.attributions.{name}") for name in ("max_n_steps", "max_internal_batch_size", "max_nt_samples")}
    parsed: AttributionOptions = read_options(AttributionOptions, options, c, {**limits, "side": (side, "the input side")})
    if "stride" not in options:  # the configured stride, at most the window
        parsed = dataclasses.replace(parsed, stride=min(c.stride, parsed.window))
    if parsed.stride > parsed.window:  # Captum's Occlusion asserts it; windows would skip pixels
        raise RequestError(f"stride {parsed.stride} is over window {parsed.window}: occlusion windows must cover every pixel")
    if method.name == "occlusion" and windows(method.input_size, parsed.window, parsed.stride) > c.max_windows:
        count = windows(method.input_size, parsed.window, parsed.stride)
        raise RequestError(
            f"window {parsed.window} with stride {parsed.stride} gives {count} occlusion positions, over this "
            f"model's limit handler.attributions.max_windows = {c.max_windows}; use a larger stride or window"
        )
    if method.passes(parsed) > c.max_passes:
        raise RequestError(
            f"these options cost {method.passes(parsed)} model passes per target, over this model's limit "
            f"handler.attributions.max_passes = {c.max_passes}"
        )
    if not parsed.noise_tunnel and "nt_samples" in options:
        raise RequestError("nt_samples needs noise_tunnel: true")
    return parsed
