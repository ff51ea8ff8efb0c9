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
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

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


def _check_keys(section: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed keys: {', '.join(allowed)}"
            raise ConfigError(f"{where}.{key}: unknown key{hint}")


def _int(value: Any, key: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: must be an integer >= {minimum}, got {value!r}")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def _choice(value: Any, choices: Sequence[str], key: str) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
    return value.lower()


def _floats(value: Any, length: int, key: str, positive: bool = False) -> tuple[float, ...]:
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


def _unit(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{key}: must be a number in [0, 1], got {value!r}")
    return float(value)


def _size(value: Any, key: str) -> tuple[int, int]:
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

    input_size: tuple[int, int] = (224, 224)
    resize: str = "stretch"
    resize_size: tuple[int, int] | None = None
    crop: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    fill: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "handler.preprocessing") -> PreprocessingConfig:
        data = {} if data is None else data
        _check_keys(data, [f.name for f in fields(cls)], where)
        kwargs: dict[str, Any] = {}
        if "input_size" in data:
            kwargs["input_size"] = _size(data["input_size"], f"{where}.input_size")
        if "resize" in data:
            kwargs["resize"] = _choice(data["resize"], RESIZE_MODES, f"{where}.resize")
        if data.get("resize_size") is not None:
            kwargs["resize_size"] = _size(data["resize_size"], f"{where}.resize_size")
        if "crop" in data:
            kwargs["crop"] = _bool(data["crop"], f"{where}.crop")
        if "mean" in data:
            kwargs["mean"] = _floats(data["mean"], 3, f"{where}.mean")
        if "std" in data:
            kwargs["std"] = _floats(data["std"], 3, f"{where}.std", positive=True)
        if "interpolation" in data:
            kwargs["interpolation"] = _choice(data["interpolation"], INTERPOLATIONS, f"{where}.interpolation")
        if "fill" in data:
            kwargs["fill"] = _floats(data["fill"], 3, f"{where}.fill")
        config = cls(**kwargs)
        size = config.resize_size or config.input_size
        if not config.crop and size != config.input_size:
            raise ConfigError(
                f"{where}.resize_size: {list(size)} differs from input_size {list(config.input_size)}; "
                "set crop: true to centre-crop, or drop resize_size"
            )
        if config.resize == "shorter_side" and not config.crop:
            raise ConfigError(f"{where}.resize: shorter_side keeps the aspect ratio, so it needs crop: true")
        if config.crop and (size[0] < config.input_size[0] or size[1] < config.input_size[1]):
            raise ConfigError(f"{where}.crop: resize_size {list(size)} is smaller than input_size")
        return config


@dataclass(frozen=True)
class ExplanationConfig:
    """Which CAMs a model may compute and how they are returned.

    - ``target_layers``: dotted layer paths (``layer4.-1``, ``blocks.-1.norm1``), resolved at load.
    - ``reshape``: ``auto`` (from the architecture), ``vit``, ``swin`` or ``none``.
    - ``methods``: the cam_engine method names a request may ask for; ``default_method`` among them.
    - ``max_targets``: the most targets one request may ask to explain.
    - ``explain_on_predict``: whether /predictions explains without being asked.
    - ``overlay_quality``: JPEG quality of overlays (heatmaps are 8-bit grayscale PNGs).
    - ``aug_smooth``/``eigen_smooth``: whether requests may turn these options on.
    """

    target_layers: tuple[str, ...] = ()
    reshape: str = "auto"
    methods: tuple[str, ...] = ("gradcam",)
    default_method: str = "gradcam"
    max_targets: int = 5
    explain_on_predict: bool = False
    overlay_quality: int = 85
    aug_smooth: bool = False
    eigen_smooth: bool = True


@dataclass(frozen=True)
class AuditConfig:
    """The ``handler.audit`` section: which requests leave an audit record, and where it goes.

    - ``enabled``: off by default; ``sample_rate``: the share of valid requests audited, in [0, 1].
    - ``store_heatmaps``: keep each audited heatmap as an 8-bit PNG (a file beside the database, or
      base64 in the JSON line); ``faithfulness``: the confidence drop when each audited heatmap's top 20%
      is removed: ``remove_top``/``true`` (mean colour, one more forward) or ``road`` (imputed, ROAD).
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

    enabled: bool = False
    sample_rate: float = 1.0
    store_heatmaps: bool = True
    faithfulness: str | bool = False  # False, "remove_top" or "road"
    sink: str = "sqlite"
    directory: str | None = None
    store_inputs: bool = False
    top_k: int = 5
    queue_size: int = 10_000
    durability: str = "async"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "handler.audit") -> AuditConfig:
        data = {} if data is None else data
        _check_keys(data, [f.name for f in fields(cls)], where)
        defaults = cls()
        rate = data.get("sample_rate", defaults.sample_rate)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ConfigError(f"{where}.sample_rate: must be a number in [0, 1], got {rate!r}")
        directory = data.get("directory")
        if directory is not None and (not isinstance(directory, str) or not directory):
            raise ConfigError(f"{where}.directory: must be a path, got {directory!r}")
        config = cls(
            enabled=_bool(data.get("enabled", defaults.enabled), f"{where}.enabled"),
            sample_rate=float(rate),
            store_heatmaps=_bool(data.get("store_heatmaps", defaults.store_heatmaps), f"{where}.store_heatmaps"),
            faithfulness=(("remove_top" if faith else False) if isinstance(faith := data.get("faithfulness", False), bool)
                          else _choice(faith, ("remove_top", "road"), f"{where}.faithfulness (or true/false)")),
            sink=_choice(data.get("sink", defaults.sink), AUDIT_SINKS, f"{where}.sink"),
            directory=directory,
            store_inputs=_bool(data.get("store_inputs", defaults.store_inputs), f"{where}.store_inputs"),
            top_k=_int(data.get("top_k", defaults.top_k), f"{where}.top_k", 1),
            queue_size=_int(data.get("queue_size", defaults.queue_size), f"{where}.queue_size", 1),
            durability=_choice(data.get("durability", defaults.durability), ("async", "strict"), f"{where}.durability"),
        )
        if config.store_inputs and config.sink != "sqlite":
            raise ConfigError(f"{where}.store_inputs: raw images are stored only with sink: sqlite, not in log lines")
        return config


@dataclass(frozen=True)
class DetectionConfig:
    """``handler.detection``: which detections are returned and explained.

    - ``score_threshold``: detections scoring below it are dropped (a request may raise or lower it);
    - ``max_detections``: the most detections one response lists;
    - ``explain_top``: boxes explained when a request names none (the best-scoring ones);
    - ``iou_threshold``: IoU a detection needs with the explained box to count in
      ``FasterRCNNBoxScoreTarget``.
    """

    score_threshold: float = 0.5
    max_detections: int = 100
    explain_top: int = 3
    iou_threshold: float = 0.5

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "handler.detection") -> DetectionConfig:
        data = {} if data is None else data
        _check_keys(data, [f.name for f in fields(cls)], where)
        return cls(
            score_threshold=_unit(data.get("score_threshold", cls.score_threshold), f"{where}.score_threshold"),
            max_detections=_int(data.get("max_detections", cls.max_detections), f"{where}.max_detections", 1),
            explain_top=_int(data.get("explain_top", cls.explain_top), f"{where}.explain_top", 1),
            iou_threshold=_unit(data.get("iou_threshold", cls.iou_threshold), f"{where}.iou_threshold"),
        )


@dataclass(frozen=True)
class SegmentationConfig:
    """``handler.segmentation``: ``background_class`` is never explained by default (None: none is)."""

    background_class: int | None = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "handler.segmentation") -> SegmentationConfig:
        data = {} if data is None else data
        _check_keys(data, [f.name for f in fields(cls)], where)
        background = data.get("background_class", cls.background_class)
        if background is not None:
            background = _int(background, f"{where}.background_class", 0)
        return cls(background_class=background)


@dataclass(frozen=True)
class EmbeddingConfig:
    """``handler.embedding``: stored concepts and reference-image limits.

    - ``concepts``: concept name -> image files (inside the archive; paths relative to the config
      at build time). Each concept's embedding is the mean of its images' L2-normalised embeddings,
      computed when the model loads.
    - ``max_references``: the most reference images one request may send.
    """

    concepts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    max_references: int = 4

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "handler.embedding") -> EmbeddingConfig:
        data = {} if data is None else data
        _check_keys(data, [f.name for f in fields(cls)], where)
        concepts = data.get("concepts") or {}
        if not isinstance(concepts, Mapping):
            raise ConfigError(f"{where}.concepts: must map concept names to lists of image files")
        parsed = []
        for name, files in concepts.items():
            if isinstance(files, str):
                files = [files]
            if not isinstance(name, str) or not name or not isinstance(files, Sequence) or not files or not all(
                isinstance(f, str) and f for f in files
            ):
                raise ConfigError(f"{where}.concepts.{name}: must be a non-empty list of image files")
            parsed.append((name, tuple(files)))
        return cls(
            concepts=tuple(parsed),
            max_references=_int(data.get("max_references", cls.max_references), f"{where}.max_references", 1),
        )


@dataclass(frozen=True)
class HandlerConfig:
    """The whole ``handler:`` section (flat keys, plus the nested ``preprocessing`` mapping).

    - ``task``: ``classifier``, ``detection``, ``segmentation`` or ``embedding`` (the handler module).
    - ``architecture``: a name in :mod:`handlers.models.architectures`; ``model_options``: keyword arguments
      for its builder (``min_size``, ``box_score_thresh``, ...).
    - ``weights``: the state-dict file inside the archive; ``labels``: a JSON list file inside the
      archive (or an inline list); ``num_classes`` defaults to the number of labels.
    - ``top_k``: predictions returned by default; ``max_image_pixels``: decoded images larger than this
      are refused before decoding (decompression bombs); ``max_heatmap_pixels``: heatmaps and overlays
      larger than this are encoded at a reduced size (same aspect); ``max_response_size``: overrides the
      response limit read from TorchServe's config (:mod:`handlers.serving.limits`).
    - ``audit``: the prediction audit trail (:class:`AuditConfig`, :mod:`handlers.audit`).
    """

    architecture: str
    weights: str | None = None
    labels: str | tuple[str, ...] | None = None
    num_classes: int | None = None
    top_k: int = 5
    max_image_pixels: int = 40_000_000
    max_heatmap_pixels: int = 4_194_304
    max_response_size: int | None = None
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    explanation: ExplanationConfig = field(default_factory=ExplanationConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    task: str = "classifier"
    model_options: tuple[tuple[str, Any], ...] = ()
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    threads: int | None = None  # torch intra-op threads; None: sized to the CPUs (handlers.serving.threads)

    #: keys of the flat ``handler:`` mapping that fill :class:`ExplanationConfig`
    EXPLANATION_KEYS = tuple(f.name for f in fields(ExplanationConfig))

    @classmethod
    def keys(cls) -> list[str]:
        own = [f.name for f in fields(cls) if f.name != "explanation"]
        return own + list(cls.EXPLANATION_KEYS)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "handler") -> HandlerConfig:
        """Parse and validate a ``handler:`` mapping; raises :class:`ConfigError` naming the key."""
        if data is None:
            raise ConfigError(f"{where}: missing; the model-config.yaml needs a handler section")
        _check_keys(data, cls.keys(), where)
        if "architecture" not in data:
            raise ConfigError(f"{where}.architecture: missing")
        architecture = data["architecture"]
        if not isinstance(architecture, str) or not architecture:
            raise ConfigError(f"{where}.architecture: must be a name, got {architecture!r}")
        weights = data.get("weights")
        if weights is not None and not isinstance(weights, str):
            raise ConfigError(f"{where}.weights: must be a file name, got {weights!r}")
        labels = data.get("labels")
        if isinstance(labels, Sequence) and not isinstance(labels, str):
            if not all(isinstance(label, str) for label in labels):
                raise ConfigError(f"{where}.labels: must be a file name or a list of names")
            labels = tuple(labels)
        elif labels is not None and not isinstance(labels, str):
            raise ConfigError(f"{where}.labels: must be a file name or a list of names, got {labels!r}")
        num_classes = data.get("num_classes")
        if num_classes is not None:
            num_classes = _int(num_classes, f"{where}.num_classes", 1)
        explanation = _explanation(data, where)
        model_options = data.get("model_options") or {}
        if not isinstance(model_options, Mapping) or not all(isinstance(k, str) for k in model_options):
            raise ConfigError(f"{where}.model_options: must be a mapping of builder keyword arguments")
        task = _choice(data.get("task", cls.task), TASKS, f"{where}.task")
        for section in ("detection", "segmentation", "embedding"):
            if data.get(section) is not None and section != task:
                raise ConfigError(f"{where}.{section}: only applies to task {section}, this config's task is {task}")
        return cls(
            task=task,
            model_options=tuple(model_options.items()),
            detection=DetectionConfig.from_dict(data.get("detection"), f"{where}.detection"),
            segmentation=SegmentationConfig.from_dict(data.get("segmentation"), f"{where}.segmentation"),
            embedding=EmbeddingConfig.from_dict(data.get("embedding"), f"{where}.embedding"),
            architecture=architecture,
            weights=weights,
            labels=labels,
            num_classes=num_classes,
            top_k=_int(data.get("top_k", cls.top_k), f"{where}.top_k", 1),
            max_image_pixels=_int(data.get("max_image_pixels", cls.max_image_pixels), f"{where}.max_image_pixels", 1),
            max_heatmap_pixels=_int(data.get("max_heatmap_pixels", cls.max_heatmap_pixels), f"{where}.max_heatmap_pixels", 1),
            max_response_size=None if data.get("max_response_size") is None
            else _int(data["max_response_size"], f"{where}.max_response_size", 1024),
            preprocessing=PreprocessingConfig.from_dict(data.get("preprocessing"), f"{where}.preprocessing"),
            explanation=explanation,
            audit=AuditConfig.from_dict(data.get("audit"), f"{where}.audit"),
            threads=None if data.get("threads") is None else _int(data["threads"], f"{where}.threads", 1),
        )


def _explanation(data: Mapping[str, Any], where: str) -> ExplanationConfig:
    defaults = ExplanationConfig()
    layers = data.get("target_layers")
    if isinstance(layers, str):
        layers = [layers]
    if not layers or not isinstance(layers, Sequence) or not all(isinstance(p, str) and p for p in layers):
        raise ConfigError(f"{where}.target_layers: must be a non-empty list of dotted layer paths, got {layers!r}")
    methods = data.get("methods", list(defaults.methods))
    if isinstance(methods, str):
        methods = [methods]
    if not methods or not isinstance(methods, Sequence) or not all(isinstance(m, str) for m in methods):
        raise ConfigError(f"{where}.methods: must be a non-empty list of method names, got {methods!r}")
    methods = tuple(m.lower() for m in methods)
    default_method = data.get("default_method", methods[0])
    if not isinstance(default_method, str) or default_method.lower() not in methods:
        raise ConfigError(f"{where}.default_method: {default_method!r} is not one of methods {list(methods)}")
    quality = _int(data.get("overlay_quality", defaults.overlay_quality), f"{where}.overlay_quality", 1)
    if quality > 100:
        raise ConfigError(f"{where}.overlay_quality: must be in 1..100, got {quality}")
    return ExplanationConfig(
        target_layers=tuple(layers),
        reshape=_choice(data.get("reshape", defaults.reshape), RESHAPES, f"{where}.reshape"),
        methods=methods,
        default_method=default_method.lower(),
        max_targets=_int(data.get("max_targets", defaults.max_targets), f"{where}.max_targets", 1),
        explain_on_predict=_bool(data.get("explain_on_predict", defaults.explain_on_predict), f"{where}.explain_on_predict"),
        overlay_quality=quality,
        aug_smooth=_bool(data.get("aug_smooth", defaults.aug_smooth), f"{where}.aug_smooth"),
        eigen_smooth=_bool(data.get("eigen_smooth", defaults.eigen_smooth), f"{where}.eigen_smooth"),
    )


@dataclass(frozen=True)
class ClipConfig:
    """The ``handler.clip`` section. ``model_dir``: the ``save_pretrained`` directory (relative = inside the
    archive, absolute = a mounted path, not archived); ``max_labels``: the most prompts one request may
    send (default prompts included); ``score``: what a heatmap explains, ``softmax`` (the prompt's
    probability among the request's prompts) or ``logit`` (the scaled cosine similarity; always used for
    a single prompt, whose probability is 1 with no gradient); ``text_cache_size``: label sets kept in
    the LRU cache of text embeddings."""

    model_dir: str = "clip"
    max_labels: int = 16
    score: str = "softmax"
    text_cache_size: int = 256

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "handler.clip") -> ClipConfig:
        data = {} if data is None else data
        _check_keys(data, [f.name for f in fields(cls)], where)
        model_dir = data.get("model_dir", cls.model_dir)
        if not isinstance(model_dir, str) or not model_dir:
            raise ConfigError(f"{where}.model_dir: must be a directory name or path, got {model_dir!r}")
        return cls(
            model_dir=model_dir,
            max_labels=_int(data.get("max_labels", cls.max_labels), f"{where}.max_labels", 1),
            score=_choice(data.get("score", cls.score), ("softmax", "logit"), f"{where}.score"),
            text_cache_size=_int(data.get("text_cache_size", cls.text_cache_size), f"{where}.text_cache_size", 1),
        )
