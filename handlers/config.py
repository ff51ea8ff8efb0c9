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
one generic reader, :func:`handlers.settings.read_section`, walks any of them: unknown keys are refused with the closest
valid key suggested, each value is checked and named by its dotted key, nested sections are read
recursively and a section's ``finish`` hook runs the checks that involve several keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cam_engine.image import COLORMAPS
from handlers.serving.codec import IMAGE_FORMATS, MULTI_FRAME, openable_formats
from handlers.settings import (
    ConfigError,
    InvalidValue,
    boolean,
    choice,
    concept_files,
    file_or_names,
    floats,
    integer,
    keyword_arguments,
    names,
    optional,
    read_section,
    section_keys,
    setting,
    size,
    text,
    unit,
)
from handlers.tasks import registry

__all__ = [
    "ConfigError",
    "PreprocessingConfig",
    "ExplanationConfig",
    "HandlerConfig",
    "AuditConfig",
    "DriftConfig",
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
TASKS = tuple(name for name, task in registry.TASKS.items() if task.config_task)  # handler.task values
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
AUDIT_SINKS = ("sqlite", "stdout", "postgres")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def faithfulness_mode(value: Any, key: str) -> str | bool:
    """``false``, ``true`` (= ``remove_top``), ``remove_top`` or ``road``."""
    if isinstance(value, bool):
        return "remove_top" if value else False
    return choice("remove_top", "road")(value, f"{key} (or true/false)")


FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}


def image_formats(value: Any, key: str) -> tuple[str, ...]:
    """Pillow format names (``JPEG``, ``PNG``, ``WEBP``, ...; case-insensitive, ``jpg``/``tif`` too) Pillow can open."""
    wanted = tuple(dict.fromkeys(FORMAT_ALIASES.get(v.upper(), v.upper()) for v in names("image format names")(value, key)))
    known = openable_formats()
    unknown = [v for v in wanted if v not in known]
    if unknown:
        raise InvalidValue(key, f"{', '.join(unknown)} cannot be opened here; Pillow opens {', '.join(known)}")
    return wanted


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

    - ``target_layers``: dotted layer paths (``layer4.-1``, ``blocks.-1.norm1``), resolved at load;
      ``auto`` (the default) is found by tracing one forward (:mod:`handlers.models.auto_layers`).
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

    target_layers: tuple[str, ...] = setting(("auto",), names("dotted layer paths (or auto)"))
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
class DriftConfig:
    """``handler.audit.drift``: the drift signals the audit exports as metrics, and the alert thresholds.

    - ``top_classes``: the audited top-1 classes counted under their own label (``AuditTopClass``); the
      rest count as ``other`` (at most ``2 * top_classes`` labels per worker, whatever the traffic);
    - ``faithfulness_floor``: the alert fires when the 1 h median faithfulness falls below it;
    - ``class_share_shift``: the alert fires when a class's share of the last hour moved by more than this
      from its share over the day before. Both are exported as gauges the shipped alert rules compare
      with (docs/audit.md: how to choose them).
    """

    top_classes: int = setting(10, integer(1, 100))
    faithfulness_floor: float = setting(0.05, unit)
    class_share_shift: float = setting(0.2, unit)


@dataclass(frozen=True)
class AuditConfig:
    """The ``handler.audit`` section: which requests leave an audit record, and where it goes.

    - ``enabled``: off by default; ``sample_rate``: the share of valid requests audited, in [0, 1].
    - ``store_heatmaps``: keep each audited heatmap as an 8-bit PNG (a file beside the database, or
      base64 in the JSON line); ``faithfulness``: the confidence drop when each audited heatmap's top 20%
      is removed: ``remove_top``/``true`` (mean colour, one more forward) or ``road`` (imputed, ROAD).
    - ``sink``: ``sqlite`` (a WAL-mode database ``audit.sqlite3`` in ``directory``), ``postgres`` (the database
      at ``dsn``, or ``$CAM_AUDIT_DSN``) or ``stdout`` (one JSON line per record, for a cluster's log
      pipeline); ``$CAM_AUDIT_SINK`` overrides it for a model that audits.
    - ``directory``: for ``sqlite``; ``~`` and ``$VARS`` are expanded and the result must be absolute.
      Unset: ``$CAM_AUDIT_DIR``, else ``$LOG_LOCATION/audit`` (TorchServe's log directory).
    - ``store_inputs``: keep the submitted image bytes (off: a record holds only their SHA-256).
    - ``top_k``: predictions kept in a record; ``queue_size``: records waiting for the writer before
      new ones are dropped (and counted) rather than slowing requests down.
    - ``durability``: ``async`` (default: records are committed by a writer thread shortly after the
      answers leave; never a failed prediction) or ``strict`` (a batch's records are committed, fsynced,
      before its answers leave; an answer whose record cannot be committed becomes a 503 AuditUnavailable).
    - ``dsn``: for ``postgres``, a libpq connection string or URI (``$VARS`` expanded); unset:
      ``$CAM_AUDIT_DSN`` (from a Kubernetes Secret).
    - ``busy_timeout_ms``: the longest one write may wait for a lock (SQLite) or for a connection and
      its statement (PostgreSQL); strict answers wait at most ``2 x busy_timeout_ms + 1 s``.
    - ``retention_days``: records (and their heatmaps and inputs) older than this are pruned by the
      writer, at most once an hour; unset: kept for ever.
    - ``drift``: the drift metrics and their alert thresholds (:class:`DriftConfig`).
    """

    enabled: bool = setting(False, boolean)
    sample_rate: float = setting(1.0, unit)
    store_heatmaps: bool = setting(True, boolean)
    faithfulness: str | bool = setting(False, faithfulness_mode)  # False, "remove_top" or "road"
    sink: str = setting("sqlite", choice(*AUDIT_SINKS))
    directory: str | None = setting(None, optional(text("a path")))
    store_inputs: bool = setting(False, boolean)
    top_k: int = setting(5, integer(1))
    queue_size: int = setting(10_000, integer(1))
    durability: str = setting("async", choice("async", "strict"))
    dsn: str | None = setting(None, optional(text("a libpq connection string")))
    busy_timeout_ms: int = setting(2000, integer(1, 600_000))
    retention_days: int | None = setting(None, optional(integer(1)))
    drift: DriftConfig = setting(DriftConfig())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "handler.audit") -> AuditConfig:
        return read_section(cls, data, where)

    def finish(self, where: str, data: Mapping[str, Any]) -> AuditConfig:
        if self.store_inputs and self.sink == "stdout":
            raise ConfigError(f"{where}.store_inputs: raw images are stored only with sink: sqlite or postgres, not in log lines")
        if self.dsn and self.sink != "postgres":
            raise ConfigError(f"{where}.dsn: only for sink: postgres (sink is {self.sink})")
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
    - ``model_file``: a Python file in the archive defining the one ``nn.Module`` class of
      ``architecture: model_file`` (TorchServe's ``--model-file``, :mod:`handlers.models.model_file`).
    - ``top_k``: predictions returned by default (None: ``min(5, classes)``, set when the model loads);
      ``max_image_pixels``: decoded images larger than this
      are refused before decoding (decompression bombs); ``max_request_pixels`` / ``max_batch_pixels``: the
      most pixels one request's images / one batch's images may claim in their headers, checked before any
      is decoded (:mod:`handlers.serving.budget`); ``image_formats``: the Pillow formats a request may send
      (JPEG, PNG, WebP, BMP, TIFF, GIF by default; no other decoder ever sees a request's bytes);
      ``multi_frame``: ``refuse`` (default) or ``first`` for animated / multi-page images; ``max_passes_per_request``:
      the most forward-pass equivalents one request's explanation may cost (400 over it; a batch is also held to
      what fits in ``responseTimeout``, :mod:`handlers.serving.cost`); ``max_heatmap_pixels``: heatmaps and overlays
      larger than this are encoded at a reduced size (same aspect); ``max_response_size``: overrides the
      response limit read from TorchServe's config (:mod:`handlers.serving.limits`).
    - ``threads``: torch intra-op threads; None: sized to the CPUs (:mod:`handlers.serving.threads`).
    - ``response_format``: ``torchserve_cam`` (our answer) or ``torchserve``: a classifier answers requests
      that are not explained as TorchServe's stock ``image_classifier`` does, ``{label: probability}``
      (:mod:`handlers.tasks.torchserve_format`).
    - sections: ``preprocessing``, ``audit`` (:mod:`handlers.audit`), and per task ``detection``,
      ``segmentation``, ``embedding``; ``clip`` for the CLIP architecture. The explanation keys
      (:class:`ExplanationConfig`) sit flat in ``handler:``.
    """

    architecture: str = setting(check=text("a name"))
    weights: str | None = setting(None, optional(text("a file name")))
    labels: str | tuple[str, ...] | None = setting(None, file_or_names)
    num_classes: int | None = setting(None, optional(integer(1)))
    top_k: int | None = setting(None, optional(integer(1)))
    model_file: str | None = setting(None, optional(text("a Python file name")))
    max_image_pixels: int = setting(40_000_000, integer(1))
    max_request_pixels: int = setting(64_000_000, integer(1))
    max_batch_pixels: int = setting(160_000_000, integer(1))
    image_formats: tuple[str, ...] = setting(IMAGE_FORMATS, image_formats)
    multi_frame: str = setting("refuse", choice(*MULTI_FRAME))
    max_heatmap_pixels: int = setting(4_194_304, integer(1))
    max_passes_per_request: int = setting(512, integer(1))
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
    response_format: str = setting("torchserve_cam", choice("torchserve_cam", "torchserve"))

    @classmethod
    def keys(cls) -> list[str]:
        return section_keys(cls)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "handler") -> HandlerConfig:
        """Parse and validate a ``handler:`` mapping; raises :class:`ConfigError` naming the key."""
        if data is None:
            raise ConfigError(f"{where}: missing; the model-config.yaml needs a handler section")
        return read_section(cls, data, where)
