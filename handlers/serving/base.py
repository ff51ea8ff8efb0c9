"""The shared TorchServe glue: decode -> validate -> batch -> cam_engine -> encode, with per-request errors.

A task handler (classifier, and later CLIP, detection, segmentation, embeddings) subclasses
:class:`CamHandler` and implements three things:

- :meth:`CamHandler.parse_task_options` - validate the JSON options only that task knows
  (``targets``, ``top_k`` for a classifier) into the :class:`ParsedRequest`;
- :meth:`CamHandler.targets_for` - the cam_engine targets each explained request asks for;
- :meth:`CamHandler.build_response` - the task's part of the response (``predictions`` ...).

The base does the rest, once for every task: reading raw bytes / multipart ``data`` / JSON
``{"image": "<base64>", ...}`` and KServe v1/v2 bodies (:mod:`handlers.serving.batch`); refusing decompression bombs before decoding; the common options
(``method``, ``aug_smooth``, ``eigen_smooth``, ``explain``, ``output``); one batched ``cam.run`` for
the whole batch (requests that want no explanation get an empty target list, so a mixed batch costs
one forward pass); mapping heatmaps back onto each submitted image; PNG/JPEG encoding after one
device-to-host copy per batch; per-request 4xx errors; custom metrics; and the management describe.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import cam_engine
from handlers.audit import Auditor
from handlers.config import ConfigError, HandlerConfig
from handlers.models import architectures, loading
from handlers.models.labels import read_labels
from handlers.serving import attributions, cost, deadline, fast_forward, limits, protocols, render, threads
from handlers.serving import batch as serving
from handlers.serving.codec import decode_image, encode_jpeg, encode_png
from handlers.serving.errors import RequestError, quote
from handlers.serving.metrics import CamMetrics, metrics_cache
from handlers.serving.options import CommonOptions, option_names, read_options
from handlers.serving.preprocess import Geometry, preprocess
from handlers.tasks.registry import TaskResult
from handlers.tasks.targets import TopClassTarget

__all__ = [
    "CamHandler",
    "ParsedRequest",
    "RequestError",
    "decode_image",
    "encode_png",
    "encode_jpeg",
    "load_handler_config",
]

logger = logging.getLogger(__name__)

#: every option name a request may give besides its task's own: derived from the option dataclasses' fields
COMMON_OPTIONS = ("image",) + option_names(CommonOptions, render.RenderOptions, attributions.AttributionOptions)


@dataclass
class ParsedRequest:
    """One validated request.

    ``image``: uint8 RGB ``[3, h, w]`` on the CPU, as submitted (EXIF orientation applied);
    ``input``: the normalised model input ``[3, H, W]``; ``geometry``: how one maps onto the other.
    ``task``: the options the task handler parsed (``targets``, ``top_k``, ...).
    """

    index: int
    image: torch.Tensor
    input: torch.Tensor
    geometry: Geometry
    explain: bool
    method: str
    aug_smooth: bool = False
    eigen_smooth: bool = False
    outputs: tuple[str, ...] = ("heatmap",)
    task: dict[str, Any] = field(default_factory=dict)
    raw: bytes = b""  # the encoded image bytes as submitted (the audit hashes them)
    audited: bool = False  # sampled for the audit trail (handlers.audit)
    request_index: int = 0  # the TorchServe request it came in (one request may carry several images)
    render: render.RenderOptions | None = None  # colormap, alpha, heatmap_format, heatmap_size
    method_options: Any = None  # a Captum method's options (handlers.serving.attributions), None for CAMs
    raw_cams: torch.Tensor | None = None  # [T, H, W] raw values (signed for Captum methods)
    failure: RequestError | None = None  # its explanation failed (a deadline): answered with this error


def load_handler_config(model_yaml_config: Mapping[str, Any] | None) -> HandlerConfig:
    """The validated ``handler:`` section of a parsed model-config.yaml."""
    return HandlerConfig.from_dict((model_yaml_config or {}).get("handler"))


# ---------------------------------------------------------------------------------------------- handler
class CamHandler:
    """Base TorchServe handler: subclasses add the task (see the module docstring)."""

    #: JSON option names the task parses in :meth:`parse_task_options`
    task_options: tuple[str, ...] = ()
    #: set by :meth:`initialize` (read-only afterwards)
    config: HandlerConfig
    model: nn.Module

    def __init__(self) -> None:
        self.initialized = False
        self.context: Any = None
        self.device = torch.device("cpu")
        self.labels: list[str] = []
        self.cams: dict[str, cam_engine.BaseCAM] = {}
        self.build_info: dict[str, Any] = {}
        self.model_name = "model"
        self.version = "1.0"

    # ------------------------------------------------------------------ loading
    def initialize(self, context: Any) -> None:
        """Load and validate everything; any problem raises :class:`ConfigError` naming the key."""
        self.context = context
        properties = context.system_properties
        model_dir = Path(properties.get("model_dir") or ".")
        self.model_name = getattr(context, "model_name", None) or "model"
        manifest = getattr(context, "manifest", None) or {}
        self.version = str(manifest.get("model", {}).get("modelVersion", "1.0"))
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        yaml_config = getattr(context, "model_yaml_config", None)
        if not yaml_config and (model_dir / "model-config.yaml").exists():
            yaml_config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
        self.config = self.load_config(yaml_config, model_dir)
        self.threads = threads.configure(yaml_config, self.config.threads)
        info_path = model_dir / "build_info.json"
        self.build_info = json.loads(info_path.read_text()) if info_path.exists() else {}
        loaded = self.load_model(model_dir)  # handlers.models.loading: weights, labels, layers, top_k resolved once
        if not isinstance(loaded, loading.LoadedModel):  # a task that builds its own module (CLIP)
            loaded = loading.adopt(loaded, self.config, self._load_labels(model_dir))
        self.config, self.labels = loaded.config, list(loaded.labels)
        self.model = loaded.model.to(self.device).eval()
        input_size = self.config.preprocessing.input_size
        fast = bool(getattr(self, "fast_forward", False))  # a task class's switch (handlers.serving.fast_forward)
        self.predict, channels_last = fast_forward.prepare(self.model, input_size, self.device, fast)
        self.cams = self._build_cams()
        # the frozen copy up to the target layer for explanations, which then take the default memory format
        split = fast_forward.split_explanations(self.cams.values(), self.model, input_size, self.device, fast)
        self.channels_last = channels_last and not split
        self._metrics = CamMetrics(context, self.model_name)
        start = time.perf_counter()
        self._warm_up()
        # forward-pass budgets; the warm-up's time is the first estimate of seconds per pass (high: a first run)
        self.costs = cost.for_handler(self, yaml_config, time.perf_counter() - start)
        self.audit = Auditor(self, context, metrics=metrics_cache(context))
        self.initialized = True
        logger.info(
            "model %s loaded from %s: handlers at %s, cam_engine at %s, weights %s",
            self.model_name,
            model_dir,
            os.path.dirname(__file__),
            os.path.dirname(cam_engine.__file__),
            self.weights_source,
        )

    def load_config(self, yaml_config: Mapping[str, Any] | None, model_dir: Path) -> HandlerConfig:
        """The validated handler config; a task with keys of its own parses them here first. A
        ``--model-file`` archive without one gets TorchServe's defaults (:func:`handlers.models.loading.read_config`)."""
        task = getattr(getattr(self, "task", None), "name", None)
        return loading.read_config(yaml_config, model_dir, getattr(self.context, "manifest", None), task)

    @property
    def weights_source(self) -> str:
        return str(self.build_info.get("weights_source", "unknown"))

    def _load_labels(self, model_dir: Path) -> list[str]:
        """The configured labels (:func:`handlers.models.labels.read_labels`), or ``num_classes`` indices."""
        labels = read_labels(self.config.labels, model_dir) or []
        if self.config.num_classes is not None and labels and len(labels) != self.config.num_classes:
            raise ConfigError(f"handler.labels: {len(labels)} labels for num_classes {self.config.num_classes}")
        if not labels and self.config.num_classes is None:
            raise ConfigError("handler.labels: give labels or num_classes")
        return labels or [str(i) for i in range(self.config.num_classes or 0)]

    def load_model(self, model_dir: Path) -> loading.LoadedModel | nn.Module:
        """The configured model with its weights, labels and CAM layers (:func:`handlers.models.loading.load_model`)."""
        return loading.load_model(self.config, model_dir, needs_labels=self.config.task != "embedding")

    def reshape_transform(self) -> Any:
        """The reshape transform for the configured ``reshape`` (``auto`` asks the architecture)."""
        reshape = self.config.explanation.reshape
        if reshape == "auto":
            try:
                reshape = architectures.get_architecture(self.config.architecture).reshape
            except KeyError:
                reshape = "none"
        return architectures.reshape_transform(reshape)

    def _build_cams(self) -> dict[str, cam_engine.BaseCAM]:
        explanation = self.config.explanation
        layers = []
        for path in explanation.target_layers:
            try:
                layers.append(cam_engine.resolve_layer(self.model, path))
            except cam_engine.LayerNotFoundError as error:
                raise ConfigError(f"handler.target_layers: {error}") from None
        reshape = self.reshape_transform()
        cams: dict[str, cam_engine.BaseCAM] = {}
        available = cam_engine.methods()
        attributions.read_limits(self.config)  # checked even where no Captum method is listed
        for name in explanation.methods:
            if attributions.is_attribution(name):
                cams[name] = attributions.build(self.config, self.model, name, layers)
                continue
            try:
                method = cam_engine.get_method(name)
            except ValueError:
                raise ConfigError(
                    f"handler.methods: {name!r} is not a cam_engine method; available: {', '.join(available)}"
                ) from None
            cams[method.name] = cam_engine.create(method.name, self.model, layers, reshape_transform=reshape)
        self._method_alias = {name: attributions.method_name(name) for name in explanation.methods}
        return cams

    def _warm_up(self) -> None:
        """One explained forward pass on a blank image, so a wrong layer or reshape fails at load time."""
        size = self.config.preprocessing.input_size
        x = torch.zeros((1, 3, *size), device=self.device)
        default = self._method_alias[self.config.explanation.default_method]
        try:
            result = self.cams[default].run(x, [self.warm_up_targets()])
        except Exception as error:  # noqa: BLE001 - re-raised with the keys that decide it
            raise ConfigError(
                f"handler.target_layers / handler.reshape: explaining with {default} at "
                f"{list(self.config.explanation.target_layers)} failed: {error}"
            ) from error
        if tuple(result.cams.shape[-2:]) != tuple(size):
            raise ConfigError(f"handler.target_layers: CAMs come out {tuple(result.cams.shape)} for input {size}")

    # ------------------------------------------------------------------ task hooks
    def warm_up_targets(self) -> list[Any]:
        """The targets of the load-time warm-up explanation on a blank image."""
        return [TopClassTarget()]

    def parse_task_options(self, request: ParsedRequest, options: Mapping[str, Any]) -> None:
        """Validate the task's own JSON options into ``request.task``; raise :class:`RequestError`."""

    def targets_for(self, request: ParsedRequest) -> list[Any]:
        """The cam_engine targets an explained request asks for (default: its top class)."""
        return [TopClassTarget()]

    def target_count(self, request: ParsedRequest) -> int:
        """How many targets an explained request asks for, known before any compute (its cost counts them,
        :mod:`handlers.serving.cost`); default: ``len(targets_for(request))``."""
        return len(self.targets_for(request))

    def build_response(
        self, request: ParsedRequest, outputs: Any, row: int, explanations: list[dict[str, Any]] | None
    ) -> TaskResult:
        """The task's typed result for ``request`` (row ``row`` of the batch ``outputs``); the answer is
        ``result.body(self.response_header())``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ request parsing
    def parse_request(self, index: int, item: Mapping[str, Any], explain_header: bool) -> ParsedRequest:
        """Validate request ``index`` of the batch; raises :class:`RequestError`."""
        raw, options = protocols.split_body(item)
        unknown = [key for key in options if key not in COMMON_OPTIONS + self.task_options]
        if unknown:
            allowed = ", ".join(k for k in COMMON_OPTIONS + self.task_options if k != "image")
            raise RequestError(f"unknown option(s) {', '.join(map(quote, unknown))}; allowed: {allowed}")
        explanation = self.config.explanation
        common: CommonOptions = read_options(CommonOptions, options, explanation)
        method = self._method_alias.get(common.method) or attributions.method_name(common.method)
        if method not in self.cams:
            raise RequestError(f"unknown method {quote(common.method)}; this model allows: {', '.join(self.cams)}")
        for smoothing in ("aug_smooth", "eigen_smooth"):
            if getattr(common, smoothing) and not getattr(explanation, smoothing):
                raise RequestError(f"{smoothing} is not enabled for this model")
        rendering: render.RenderOptions = read_options(render.RenderOptions, options, explanation)
        method_options = None  # a CAM method given no Captum option takes none; parse_options words any refusal
        if isinstance(self.cams[method], attributions.CaptumMethod) or not options.keys().isdisjoint(attributions.OPTIONS):
            method_options = attributions.parse_options(self.cams[method], options, common.aug_smooth or common.eigen_smooth)
        image = decode_image(raw, self.config.max_image_pixels, self.config.image_formats, self.config.multi_frame)
        model_input, geometry = preprocess(image, self.config.preprocessing)
        request = ParsedRequest(
            index=index,
            image=image,
            input=model_input,
            geometry=geometry,
            explain=common.explain or explain_header,
            method=method,
            aug_smooth=common.aug_smooth,
            eigen_smooth=common.eigen_smooth,
            outputs=common.output,
            raw=raw,
            render=rendering,
            method_options=method_options,
        )
        self.parse_task_options(request, options)
        return request

    # ------------------------------------------------------------------ the batch
    def explain_batch(
        self, batch: torch.Tensor, requests: list[ParsedRequest]
    ) -> tuple[Any, list[torch.Tensor | None]]:
        """Model outputs for the whole batch and, per request, its CAMs ``[T, H, W]`` (None if unexplained).

        One ``cam.run`` over the whole batch serves every request with the most common (method,
        eigen_smooth) among those without aug_smooth; requests that want no explanation ride along with
        an empty target list. Other combinations run on their own images only.
        """
        cams: list[torch.Tensor | None] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for position, request in enumerate(requests):
            if request.explain or request.audited:  # audited: a heatmap for the record, same run
                key = (request.method, request.aug_smooth, request.eigen_smooth, request.method_options)
                groups.setdefault(key, []).append(position)
        plain = [key for key in groups if not key[1]]
        main = max(plain, key=lambda k: len(groups[k])) if plain else None
        batch = batch.contiguous(memory_format=torch.channels_last) if self.channels_last and groups else batch
        if main is None:
            outputs = self.predict(batch)  # under inference_mode
        else:
            members = set(groups[main])
            targets = [self.targets_for(r) if i in members else [] for i, r in enumerate(requests)]
            outputs = self._run(main, batch, targets, list(range(len(requests))), cams, requests)
        for key, positions in groups.items():
            if key != main:
                targets = [self.targets_for(requests[i]) for i in positions]
                self._run(key, batch[positions], targets, positions, cams, requests)
        return outputs, cams

    def _run(
        self,
        key: tuple[Any, ...],
        batch: torch.Tensor,
        targets: list[list[Any]],
        positions: list[int],
        cams: list[torch.Tensor | None],
        requests: list[ParsedRequest],
    ) -> Any:
        method, aug_smooth, eigen_smooth, options = key
        start = time.perf_counter()
        extra = {} if options is None else {"options": options}  # a Captum method's (handlers.serving.attributions)
        try:
            with deadline.active(self.costs.batch_deadline):
                result = self.cams[method].run(batch, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth, **extra)
        except deadline.DeadlineExceeded as error:  # this run's explained requests answer 503; the batch goes on
            for local, position in enumerate(positions):
                if targets[local]:
                    requests[position].failure = error
            return self.predict(batch)
        per_target = cost.passes_per_target(self.cams[method], method, options, aug_smooth, self.costs.channels)
        self.costs.observe(per_target * len(result.pairs), time.perf_counter() - start)
        raw = getattr(result, "raw", None)
        rows: dict[int, list[int]] = {}
        for row, (image, _) in enumerate(result.pairs):
            rows.setdefault(image, []).append(row)
        for local, position in enumerate(positions):
            if local in rows:
                first, last = rows[local][0], rows[local][-1]
                cams[position] = result.cams[first : last + 1]
                requests[position].raw_cams = None if raw is None else raw[first : last + 1]
        self._metrics.cam(method, (time.perf_counter() - start) * 1000, len(result.pairs))
        return result.outputs

    def encode_explanations(
        self, requests: list[ParsedRequest], cams: list[torch.Tensor | None]
    ) -> list[list[dict[str, Any]] | None]:
        """Per request, its heatmaps/overlays (or raw maps) encoded (:func:`handlers.serving.render.encode_explanations`)."""
        explanation = self.config.explanation
        return render.encode_explanations(
            requests, cams, self._metrics, self.config.max_heatmap_pixels, explanation.overlay_quality
        )

    def explanation_meta(self, request: ParsedRequest) -> dict[str, Any]:
        """Fields every explanation of ``request`` carries: method and layers."""
        return {"method": request.method, "layers": list(self.config.explanation.target_layers)}

    # ------------------------------------------------------------------ entry point
    def describe(self) -> dict[str, Any]:
        """What ``GET /models/<name>?customized=true`` shows: weights source, methods, preprocessing."""
        config = self.config
        return {
            "architecture": config.architecture,
            "weights_source": self.weights_source,
            "build": self.build_info,
            "num_classes": len(self.labels),
            "methods": list(self.cams),
            "default_method": config.explanation.default_method,
            "target_layers": list(config.explanation.target_layers),
            "input_size": list(config.preprocessing.input_size),
            "resize": config.preprocessing.resize,
            "crop": config.preprocessing.crop,
            "max_targets": config.explanation.max_targets,
            "max_image_pixels": config.max_image_pixels,
            "max_heatmap_pixels": config.max_heatmap_pixels,
            "max_response_size": dict(zip(("bytes", "source"), self.response_limit)),
            "device": str(self.device),
            "threads": {"torch": self.threads.threads, "source": self.threads.source, "cpus": self.threads.cpus},
        }

    def handle(self, data: Sequence[Mapping[str, Any]] | None, context: Any) -> list[str]:
        """TorchServe's entry point: one JSON string per request (native, KServe v1 or v2), 4xx for bad ones."""
        if not self.initialized:
            self.initialize(context)
        if data is None:
            return []
        self.context = context
        return serving.handle_batch(self, data, context)

    @property
    def response_limit(self) -> tuple[int, str]:
        """``(bytes, source)``: the longest answer TorchServe's frontend passes on (:mod:`handlers.serving.limits`)."""
        if not hasattr(self, "_response_limit"):
            self._response_limit = limits.max_response_size(
                self.config.max_response_size if hasattr(self, "config") else None
            )
        return self._response_limit

    def class_indices(self, value: Any, option: str, noun: str) -> list[int] | None:
        """A request's class option (one index or label, or a list of them) -> class indices.

        None stays None (the task's default). Labels match case-insensitively (the first of equal
        labels wins); at most ``max_targets`` per request. ``option`` and ``noun`` word the errors
        (``targets``/``target`` for a classifier, ``classes``/``class`` for a segmenter).
        """
        if value is None:
            return None
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value:
            raise RequestError(f"{option} must be a non-empty list of class indices or labels, got {quote(value)}")
        limit = self.config.explanation.max_targets
        if len(value) > limit:
            raise RequestError(f"{len(value)} {option} asked, this model allows at most {limit} per request")
        count = len(self.labels)
        if not hasattr(self, "_label_index"):
            self._label_index = {label.lower(): i for i, label in reversed(list(enumerate(self.labels)))}
        indices = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise RequestError(f"a {noun} must be a class index or a label, got {quote(item)}")
            if isinstance(item, int):
                if not 0 <= item < count:
                    raise RequestError(f"{noun} {item} is out of range: this model has classes 0..{count - 1}")
                indices.append(item)
                continue
            index = self._label_index.get(item.strip().lower())
            if index is None:
                raise RequestError(f"unknown {noun} {quote(item)}")
            indices.append(index)
        return indices

    def response_header(self) -> dict[str, Any]:
        """The first fields of every response."""
        return {"model": self.model_name, "version": self.version, "weights": self.weights_source}
