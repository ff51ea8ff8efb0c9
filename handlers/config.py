"""The ``handler:`` section of a model-config.yaml, parsed into one frozen dataclass per concern.

A model-config.yaml holds TorchServe's own top-level keys (batchSize, maxBatchDelay, responseTimeout,
minWorkers, maxWorkers) beside a ``handler:`` section that belongs to us::

    batchSize: 4
    maxBatchDelay: 20
    handler:
      architecture: efficientnet_lite0
      weights: weights.pt
      labels: labels.json
      preprocessing: {input_size: [224, 224], resize: stretch, crop: null,
                      mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], interpolation: bilinear}
      target_layers: [bn2]
      reshape: auto
      methods: [gradcam, layercam, eigencam]
      default_method: gradcam

Everything is checked when the model loads: an unknown key, a wrong type or a value out of range
raises :class:`ConfigError` whose message starts with the dotted key (``handler.preprocessing.mean``).
Checks that need the model (layer paths, method names) live in :mod:`handlers.serving.base`, which raises the
same error type.

Every section is a frozen dataclass whose fields declare their own check (``setting(default, check)``);
one generic reader, :func:`read_section`, walks any of them: unknown keys are refused with the closest
valid key suggested, each value is checked and named by its dotted key, nested sections are read
recursively and a section's ``finish`` hook runs the checks that involve several keys.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from cam_engine.image import COLORMAPS

__all__ = [
    "ConfigError",
    "PreprocessingConfig",
    "ExplanationConfig",
    "HandlerConfig",
    "AuditConfig",
    "ClipConfig",
    "AUDIT_SINKS",
    "RESIZE_MODES",
    "RESHAPES",
    "INTERPOLATIONS",
    "TASKS",
    "DetectionConfig",
    "SegmentationConfig",
    "EmbeddingConfig",
    "read_section",
    "setting",
]

RESIZE_MODES = ("stretch", "letterbox", "shorter_side")
RESHAPES = ("auto", "vit", "swin", "fasterrcnn", "none")
TASKS = ("classifier", "detection", "segmentation", "embedding")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
AUDIT_SINKS = ("sqlite", "stdout")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A model config is invalid; the message names the offending key (``handler.top_k: ...``)."""


# --- checks: each takes (value, dotted key) and returns the parsed value or raises ConfigError -------------

Check = Callable[[Any, str], Any]


def integer(minimum: int = 0, maximum: int | None = None) -> Check:
    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}: must be an integer >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{key}: must be in {minimum}..{maximum}, got {value}")
        return value

    return check


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def choice(*choices: str) -> Check:
    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return check


def floats(length: int, positive: bool = False) -> Check:
    def check(value: Any, key: str) -> tuple[float, ...]:
        if (
            not isinstance(value, Sequence)
            or isinstance(value, str)
            or len(value) != length
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise ConfigError(f"{key}: must be a list of {length} numbers, got {value!r}")
        if positive and any(v <= 0 for v in value):
            raise ConfigError(f"{key}: every value must be > 0, got {value!r}")
        return tuple(float(v) for v in value)

    return check


def unit(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{key}: must be a number in [0, 1], got {value!r}")
    return float(value)


def size(value: Any, key: str) -> tuple[int, int]:
    """An int (square) or ``[height, width]``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ConfigError(f"{key}: must be a positive int or [height, width], got {value!r}")
    return int(value[0]), int(value[1])


def text(what: str) -> Check:
    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be {what}, got {value!r}")
        return value

    return check


def optional(inner: Check) -> Check:
    """``None`` stays ``None``; anything else goes through ``inner``."""
    return lambda value, key: None if value is None else inner(value, key)


def names(what: str, lower: bool = False) -> Check:
    """A name or a non-empty list of names -> a tuple."""

    def check(value: Any, key: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not value or not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key}: must be a non-empty list of {what}, got {value!r}")
        return tuple(v.lower() if lower else v for v in value)

    return check


def file_or_names(value: Any, key: str) -> str | tuple[str, ...] | None:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not all(isinstance(label, str) for label in value):
            raise ConfigError(f"{key}: must be a file name or a list of names")
        return tuple(value)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key}: must be a file name or a list of names, got {value!r}")
    return value


def keyword_arguments(value: Any, key: str) -> tuple[tuple[str, Any], ...]:
    value = value or {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{key}: must be a mapping of builder keyword arguments")
    return tuple(value.items())


def concept_files(value: Any, key: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    value = value or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: must map concept names to lists of image files")
    parsed = []
    for name, files in value.items():
        if isinstance(files, str):
            files = [files]
        if not isinstance(name, str) or not name or not isinstance(files, Sequence) or not files or not all(
            isinstance(f, str) and f for f in files
        ):
            raise ConfigError(f"{key}.{name}: must be a non-empty list of image files")
        parsed.append((name, tuple(files)))
    return tuple(parsed)


# --- the generic reader ----------------------------------------------------------------------------------


def setting(default: Any = dataclasses.MISSING, check: Check | None = None, **meta: Any) -> Any:
    """A dataclass field read by :func:`read_section`: ``check(value, dotted_key)`` parses a given value
    (defaults are trusted). ``meta``: ``only_for_task``/``only_for_architecture`` refuse a section given
    for another task/architecture; ``flat=True`` reads a nested section from the parent's own keys."""
    metadata = {"check": check, **meta}
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section_keys(cls: type) -> list[str]:
    """The keys a section accepts (a ``flat`` nested section's keys count as the parent's own)."""
    keys: list[str] = []
    for f in fields(cls):
        if f.metadata.get("flat"):
            keys += section_keys(_section_type(cls, f))
        else:
            keys.append(f.name)
    return keys


def _section_type(cls: type, f: dataclasses.Field) -> type | None:
    return f.default_factory if dataclasses.is_dataclass(f.default_factory) else None  # type: ignore[arg-type]


def _check_keys(section: Any, allowed: Sequence[str], where: str) -> None:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed keys: {', '.join(allowed)}"
            raise ConfigError(f"{where}.{key}: unknown key{hint}")


def read_section(cls: type, data: Mapping[str, Any] | None, where: str) -> Any:
    """Parse and validate the mapping ``data`` into the section dataclass ``cls``; every error is a
    :class:`ConfigError` whose message starts with the dotted key (``handler.preprocessing.mean: ...``)."""
    data = {} if data is None else data
    _check_keys(data, section_keys(cls), where)
    values: dict[str, Any] = {}
    for f in fields(cls):
        nested = _section_type(cls, f)
        if f.metadata.get("flat"):
            values[f.name] = read_section(nested, {k: data[k] for k in section_keys(nested) if k in data}, where)
        elif nested is not None:
            values[f.name] = read_section(nested, data.get(f.name), f"{where}.{f.name}")
        elif f.name in data:
            check = f.metadata.get("check")
            values[f.name] = check(data[f.name], f"{where}.{f.name}") if check else data[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{f.name}: missing")
    for f in fields(cls):
        for meta, attribute, what in (("only_for_task", "task", "task"), ("only_for_architecture", "architecture", "architecture")):
            wanted = f.metadata.get(meta)
            if wanted is None or data.get(f.name) is None:
                continue
            actual = values.get(attribute, getattr(cls, attribute, None))
            if actual != wanted:
                raise ConfigError(f"{where}.{f.name}: only applies to {what} {wanted}, this config's {what} is {actual}")
    config = cls(**values)
    finish = getattr(config, "finish", None)
    return finish(where, data) if finish else config


# --- the sections -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessingConfig:
    """How a submitted image becomes the model input ``[3, H, W]``.

    - ``input_size``: the model input ``(H, W)``.
    - ``resize``: ``stretch`` resizes the whole image to ``resize_size`` (aspect ratio not kept);
      ``letterbox`` fits the whole image inside ``resize_size`` and pads with ``fill``;
      ``shorter_side`` scales the shorter side to ``min(resize_size)``, keeping the aspect ratio.
    - ``resize_size``: defaults to ``input_size``.
    - ``crop``: centre-crop the resized image to ``input_size`` (needed when the resized image is larger).
      Off by default, so the model sees every submitted pixel.
    - ``mean``/``std``: per-channel normalisation of [0, 1] RGB.
    - ``interpolation``: bilinear, bicubic or nearest (antialiased when downscaling).
    - ``fill``: letterbox padding value in [0, 1] RGB before normalisation.
    """

    input_size: tuple[int, int] = setting((224, 224), size)
    resize: str = setting("stretch", choice(*RESIZE_MODES))
    resize_size: tuple[int, int] | None = setting(None, optional(size))
    crop: bool = setting(False, boolean)
    mean: tuple[float, float, float] = setting(IMAGENET_MEAN, floats(3))
    std: tuple[float, float, float] = setting(IMAGENET_STD, floats(3, positive=True))
    interpolation: str = setting("bilinear", choice(*INTERPOLATIONS))
    fill: tuple[float, float, float] = setting((0.0, 0.0, 0.0), floats(3))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "handler.preprocessing") -> PreprocessingConfig:
        return read_section(cls, data, where)

    def finish(self, where: str, data: Mapping[str, Any]) -> PreprocessingConfig:
        resized = self.resize_size or self.input_size
        if not self.crop and resized != self.input_size:
            raise ConfigError(
                f"{where}.resize_size: {list(resized)} differs from input_size {list(self.input_size)}; "
                "set crop: true to centre-crop, or drop resize_size"
            )
        if self.resize == "shorter_side" and not self.crop:
            raise ConfigError(f"{where}.resize: shorter_side keeps the aspect ratio, so it needs crop: true")
        if self.crop and (resized[0] < self.input_size[0] or resized[1] < self.input_size[1]):
            raise ConfigError(f"{where}.crop: resize_size {list(resized)} is smaller than input_size")
        return self


@dataclass(frozen=True)
class ExplanationConfig:
    """Which CAMs a model may compute and how they are returned (flat keys of ``handler:``).

    - ``target_layers``: dotted layer paths (``layer4.-1``, ``blocks.-1.norm1``), resolved at load.
    - ``reshape``: ``auto`` (from the architecture), ``vit``, ``swin``, ``fasterrcnn`` or ``none``.
    - ``methods``: the cam_engine method names a request may ask for; ``default_method`` among them
      (default: the first).
    - ``max_targets``: the most targets one request may ask to explain.
    - ``explain_on_predict``: whether /predictions explains without being asked.
    - ``overlay_quality``: JPEG quality of overlays (heatmaps are 8-bit grayscale PNGs).
    - ``aug_smooth``/``eigen_smooth``: whether requests may turn these options on.
    - ``overlay_colormap`` (an OpenCV name: jet, viridis, inferno, turbo, ...) and ``overlay_alpha`` (the
      colour map's weight in [0, 1]): request defaults for overlays.
    - ``attributions``: Captum method defaults and limits (:mod:`handlers.serving.attributions`).
    """

    target_layers: tuple[str, ...] = setting((), names("dotted layer paths"))
    reshape: str = setting("auto", choice(*RESHAPES))
    methods: tuple[str, ...] = setting(("gradcam",), names("method names", lower=True))
    default_method: str = setting("gradcam", text("a method name"))
    max_targets: int = setting(5, integer(1))
    explain_on_predict: bool = setting(False, boolean)
    overlay_quality: int = setting(85, integer(1, 100))
    aug_smooth: bool = setting(False, boolean)
    eigen_smooth: bool = setting(True, boolean)
    overlay_colormap: str = setting("jet", choice(*COLORMAPS))
    overlay_alpha: float = setting(0.5, unit)
    attributions: tuple[tuple[str, Any], ...] = setting((), keyword_arguments)

    def finish(self, where: str, data: Mapping[str, Any]) -> ExplanationConfig:
        if not self.target_layers:
            raise ConfigError(f"{where}.target_layers: must be a non-empty list of dotted layer paths, got None")
        default = self.default_method.lower() if "default_method" in data else self.methods[0]
        if default not in self.methods:
            raise ConfigError(f"{where}.default_method: {self.default_method!r} is not one of methods {list(self.methods)}")
        return dataclasses.replace(self, default_method=default)


@dataclass(frozen=True)
class AuditConfig:
    """The ``handler.audit`` section: which requests leave an audit record, and where it goes.

    - ``enabled``: off by default; ``sample_rate``: the share of valid requests audited, in [0, 1].
    - ``store_heatmaps``: keep each audited heatmap as an 8-bit PNG (a file beside the database, or
      base64 in the JSON line); ``faithfulness``: score each audited heatmap by the drop in target
      confidence when its top 20% of pixels are removed (one extra batched forward per batch).
    - ``sink``: ``sqlite`` (a WAL-mode database ``audit.sqlite3`` in ``directory``) or ``stdout``
      (one JSON line per record, for a cluster's log pipeline).
    - ``directory``: for ``sqlite``; ``~`` and ``$VARS`` are expanded and the result must be absolute.
      Unset: ``$CAM_AUDIT_DIR``, else ``$LOG_LOCATION/audit`` (TorchServe's log directory).
    - ``store_inputs``: keep the submitted image bytes (off: a record holds only their SHA-256).
    - ``top_k``: predictions kept in a record; ``queue_size``: records waiting for the writer before
      new ones are dropped (and counted) rather than slowing requests down.
    - ``durability``: ``async`` (default: records are committed by a writer thread shortly after the
      answers leave) or ``strict`` (a batch's records are committed, fsynced, before its answers leave).
    """

    enabled: bool = setting(False, boolean)
    sample_rate: float = setting(1.0, unit)
    store_heatmaps: bool = setting(True, boolean)
    faithfulness: bool = setting(False, boolean)
    sink: str = setting("sqlite", choice(*AUDIT_SINKS))
    directory: str | None = setting(None, optional(text("a path")))
    store_inputs: bool = setting(False, boolean)
    top_k: int = setting(5, integer(1))
    queue_size: int = setting(10_000, integer(1))
    durability: str = setting("async", choice("async", "strict"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "handler.audit") -> AuditConfig:
        return read_section(cls, data, where)

    def finish(self, where: str, data: Mapping[str, Any]) -> AuditConfig:
        if self.store_inputs and self.sink != "sqlite":
            raise ConfigError(f"{where}.store_inputs: raw images are stored only with sink: sqlite, not in log lines")
        return self


@dataclass(frozen=True)
class DetectionConfig:
    """``handler.detection``: which detections are returned and explained.

    - ``score_threshold``: detections scoring below it are dropped (a request may raise or lower it);
    - ``max_detections``: the most detections one response lists;
    - ``explain_top``: boxes explained when a request names none (the best-scoring ones);
    - ``iou_threshold``: IoU a detection needs with the explained box to count in
      ``FasterRCNNBoxScoreTarget``.
    """

    score_threshold: float = setting(0.5, unit)
    max_detections: int = setting(100, integer(1))
    explain_top: int = setting(3, integer(1))
    iou_threshold: float = setting(0.5, unit)


@dataclass(frozen=True)
class SegmentationConfig:
    """``handler.segmentation``: ``background_class`` is never explained by default (None: none is)."""

    background_class: int | None = setting(0, optional(integer(0)))


@dataclass(frozen=True)
class EmbeddingConfig:
    """``handler.embedding``: stored concepts and reference-image limits.

    - ``concepts``: concept name -> image files (inside the archive; paths relative to the config
      at build time). Each concept's embedding is the mean of its images' L2-normalised embeddings,
      computed when the model loads.
    - ``max_references``: the most reference images one request may send.
    """

    concepts: tuple[tuple[str, tuple[str, ...]], ...] = setting((), concept_files)
    max_references: int = setting(4, integer(1))


@dataclass(frozen=True)
class ClipConfig:
    """The ``handler.clip`` section. ``model_dir``: the ``save_pretrained`` directory (relative = inside the
    archive, absolute = a mounted path, not archived); ``max_labels``: the most prompts one request may
    send (default prompts included); ``score``: what a heatmap explains, ``softmax`` (the prompt's
    probability among the request's prompts) or ``logit`` (the scaled cosine similarity; always used for
    a single prompt, whose probability is 1 with no gradient); ``text_cache_size``: label sets kept in
    the LRU cache of text embeddings."""

    model_dir: str = setting("clip", text("a directory name or path"))
    max_labels: int = setting(16, integer(1))
    score: str = setting("softmax", choice("softmax", "logit"))
    text_cache_size: int = setting(256, integer(1))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "handler.clip") -> ClipConfig:
        return read_section(cls, data, where)


@dataclass(frozen=True)
class HandlerConfig:
    """The whole ``handler:`` section (flat keys, plus the nested sections).

    - ``task``: ``classifier``, ``detection``, ``segmentation`` or ``embedding`` (the handler module).
    - ``architecture``: a name in :mod:`handlers.models.architectures`; ``model_options``: keyword arguments
      for its builder (``min_size``, ``box_score_thresh``, ...).
    - ``weights``: the state-dict file inside the archive; ``labels``: a JSON list file inside the
      archive (or an inline list); ``num_classes`` defaults to the number of labels.
    - ``top_k``: predictions returned by default; ``max_image_pixels``: decoded images larger than this
      are refused before decoding (decompression bombs); ``max_heatmap_pixels``: heatmaps and overlays
      larger than this are encoded at a reduced size (same aspect); ``max_response_size``: overrides the
      response limit read from TorchServe's config (:mod:`handlers.serving.limits`).
    - ``threads``: torch intra-op threads; None: sized to the CPUs (:mod:`handlers.serving.threads`).
    - sections: ``preprocessing``, ``audit`` (:mod:`handlers.audit`), and per task ``detection``,
      ``segmentation``, ``embedding``; ``clip`` for the CLIP architecture. The explanation keys
      (:class:`ExplanationConfig`) sit flat in ``handler:``.
    """

    architecture: str = setting(check=text("a name"))
    weights: str | None = setting(None, optional(text("a file name")))
    labels: str | tuple[str, ...] | None = setting(None, file_or_names)
    num_classes: int | None = setting(None, optional(integer(1)))
    top_k: int = setting(5, integer(1))
    max_image_pixels: int = setting(40_000_000, integer(1))
    max_heatmap_pixels: int = setting(4_194_304, integer(1))
    max_response_size: int | None = setting(None, optional(integer(1024)))
    preprocessing: PreprocessingConfig = setting(PreprocessingConfig())
    explanation: ExplanationConfig = setting(ExplanationConfig(), flat=True)
    audit: AuditConfig = setting(AuditConfig())
    task: str = setting("classifier", choice(*TASKS))
    model_options: tuple[tuple[str, Any], ...] = setting((), keyword_arguments)
    detection: DetectionConfig = setting(DetectionConfig(), only_for_task="detection")
    segmentation: SegmentationConfig = setting(SegmentationConfig(), only_for_task="segmentation")
    embedding: EmbeddingConfig = setting(EmbeddingConfig(), only_for_task="embedding")
    clip: ClipConfig = setting(ClipConfig(), only_for_architecture="clip")
    threads: int | None = setting(None, optional(integer(1)))

    @classmethod
    def keys(cls) -> list[str]:
        return section_keys(cls)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "handler") -> HandlerConfig:
        """Parse and validate a ``handler:`` mapping; raises :class:`ConfigError` naming the key."""
        if data is None:
            raise ConfigError(f"{where}: missing; the model-config.yaml needs a handler section")
        return read_section(cls, data, where)
