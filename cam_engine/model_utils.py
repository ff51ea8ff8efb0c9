"""Small helpers shared by the engine and its extras: model device and mode, output structures.

Public so that every module of ``cam_engine`` (and extensions written by users) can use them.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from .targets import ClassifierOutputTarget

__all__ = [
    "all_modules",
    "forget_modules",
    "eval_mode",
    "model_device_dtype",
    "model_scores",
    "default_targets",
    "per_image",
    "map_structure",
    "tensors_of",
]


def model_scores(outputs: Any) -> Any:
    """The part of a model's output that targets read.

    ``logits`` of a HuggingFace ModelOutput or dict when present; the first element of a tuple of
    tensors; otherwise the output itself (a tensor, or a list of per-image dicts for detectors).
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    if isinstance(outputs, tuple) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    return outputs


def per_image(scores: Any, index: int) -> Any:
    """Image ``index``'s part of the model scores (a row of a tensor, an element of a list)."""
    return scores[index]


def default_targets(scores: Any, batch: int) -> list[ClassifierOutputTarget]:
    """Each image's top class as a [`ClassifierOutputTarget`][cam_engine.model_utils.ClassifierOutputTarget] (scores ``[B, K]`` or ``[B, ...]``)."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(
            "targets=None needs a model that returns class scores; pass explicit targets for this model"
        )
    flat = scores.reshape(scores.shape[0], -1) if scores.ndim > 2 else scores
    return [ClassifierOutputTarget(int(c)) for c in flat.argmax(dim=-1).tolist()]


def tensors_of(structure: Any) -> list[torch.Tensor]:
    """Every tensor in a nested structure of tensors, mappings, lists and tuples, in order."""
    if isinstance(structure, torch.Tensor):
        return [structure]
    if isinstance(structure, Mapping):
        return [t for v in structure.values() for t in tensors_of(v)]
    if isinstance(structure, (list, tuple)):
        return [t for v in structure for t in tensors_of(v)]
    return []


def map_structure(structure: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """The same nested structure with ``fn`` applied to every tensor (named tuples kept)."""
    if isinstance(structure, torch.Tensor):
        return fn(structure)
    if isinstance(structure, Mapping):
        return type(structure)((k, map_structure(v, fn)) for k, v in structure.items())
    if isinstance(structure, tuple) and hasattr(structure, "_fields"):
        return type(structure)(*(map_structure(v, fn) for v in structure))
    if isinstance(structure, (list, tuple)):
        return type(structure)(map_structure(v, fn) for v in structure)
    return structure


# Module lists of the models eval_mode has seen, kept while no submodule is registered anywhere (a walk of
# EfficientNet-Lite0's 273 modules costs about 0.3 ms per call; the cached list a few microseconds).
# The cache holds weak references only: a model's list must not keep the model (its first module) or any
# submodule alive, or every model a process ever explained would stay in memory.
_MODULES: weakref.WeakKeyDictionary[nn.Module, tuple[int, tuple[weakref.ref[nn.Module], ...]]] = (
    weakref.WeakKeyDictionary()
)
_GENERATION = [0]
_HOOK: list[Any] = []  # the registration hook's handle, installed by the first all_modules call


def _registered(module: nn.Module, name: str, submodule: Any) -> None:
    _GENERATION[0] += 1  # any module registered anywhere (add_module, attribute assignment): walk again


def all_modules(model: nn.Module) -> tuple[nn.Module, ...]:
    """``tuple(model.modules())``, cached per model until a submodule is registered anywhere in the
    process (``add_module``, ``register_module``, attribute assignment of a module). A structure change
    that bypasses registration (``ModuleList.insert``, direct ``_modules`` edits) needs
    `forget_modules`.

    The cache keeps no model alive (weak references only). The process-wide module-registration hook
    that invalidates it is installed by the first call, not at import."""
    if not _HOOK:
        _HOOK.append(register_module_module_registration_hook(_registered))
    cached = _MODULES.get(model)
    if cached is not None and cached[0] == _GENERATION[0]:
        modules = tuple(ref() for ref in cached[1])
        if all(module is not None for module in modules):
            return modules  # type: ignore[return-value]
    modules = tuple(model.modules())
    _MODULES[model] = (_GENERATION[0], tuple(weakref.ref(module) for module in modules))
    return modules


def forget_modules(model: nn.Module | None = None) -> None:
    """Drop the cached module list of ``model`` (of every model when None)."""
    if model is None:
        _MODULES.clear()
    else:
        _MODULES.pop(model, None)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside the block; the modules that were training are restored.

    Reads each module's ``training`` flag on every call (``train()`` / ``eval()`` between calls are
    honoured); the list of modules comes from `all_modules`."""
    training = [m for m in all_modules(model) if m.training]
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """The device of the model's first parameter or buffer and its first floating dtype (or None).

    Read on every call (``.to()`` between calls is honoured); it stops at the first floating tensor."""
    first = None
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
        if first is None:
            first = tensor
    if first is not None:
        return first.device, None
    return torch.device("cpu"), None
