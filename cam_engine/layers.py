"""Resolve target layers given as modules or dotted paths such as ``"layer4.-1"``."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = ["resolve_layer", "resolve_layers", "LayerNotFoundError"]


class LayerNotFoundError(ValueError):
    """A dotted layer path does not name a sub-module of the model."""


def _child(module: nn.Module, part: str) -> nn.Module | None:
    if part in module._modules:
        return module._modules[part]
    try:
        index = int(part)
    except ValueError:
        return getattr(module, part, None) if isinstance(getattr(module, part, None), nn.Module) else None
    children = list(module.children())
    if -len(children) <= index < len(children):
        return children[index]
    return None


def _suggestions(model: nn.Module, path: str, n: int = 5) -> list[str]:
    names = [name for name, _ in model.named_modules() if name]
    # Offer negative-index spellings too, so "layer4.-1" style paths can be suggested.
    aliases: dict[str, str] = {}
    for name, module in model.named_modules():
        children = list(module._modules.keys())
        for i, key in enumerate(children):
            if key.isdigit():
                full = f"{name}.{key}" if name else key
                aliases[f"{name}.{i - len(children)}" if name else str(i - len(children))] = full
    candidates = names + list(aliases)
    close = difflib.get_close_matches(path, candidates, n=n, cutoff=0.5)
    if not close:
        prefix = path.rsplit(".", 1)[0]
        close = [c for c in names if c.startswith(prefix)][:n]
    return close


def resolve_layer(model: nn.Module, layer: nn.Module | str) -> nn.Module:
    """Return the sub-module that ``layer`` names.

    ``layer`` may be a module (returned as is) or a dotted path of attribute names and integer
    indices, where negative indices count from the end: ``"layer4.-1"``, ``"blocks.-1.norm1"``,
    ``"features.-1"``. An empty path or ``"."`` means the model itself.
    """
    if isinstance(layer, nn.Module):
        return layer
    if not isinstance(layer, str):
        raise TypeError(f"a target layer must be an nn.Module or a dotted path, got {type(layer).__name__}")
    path = layer.strip()
    if path in ("", "."):
        return model
    module = model
    walked: list[str] = []
    for part in path.split("."):
        child = _child(module, part)
        if child is None:
            where = ".".join(walked) or "the model"
            prefix = f"{'.'.join(walked)}." if walked else ""
            local = difflib.get_close_matches(part, list(module._modules), n=3, cutoff=0.3)
            close = [prefix + name for name in local]
            close += [c for c in _suggestions(model, path) if c not in close]
            close = close[:5]
            hint = f" Closest valid paths: {', '.join(close)}." if close else ""
            raise LayerNotFoundError(
                f"target layer {path!r} does not resolve: {where} has no sub-module {part!r}.{hint}"
            )
        module = child
        walked.append(part)
    return module


def resolve_layers(model: nn.Module, layers: nn.Module | str | Iterable[nn.Module | str]) -> list[nn.Module]:
    """Resolve one layer or a list of layers (modules or dotted paths) to modules."""
    if isinstance(layers, (nn.Module, str)):
        layers = [layers]
    resolved = [resolve_layer(model, layer) for layer in layers]
    if not resolved:
        raise ValueError("target_layers is empty: name at least one layer")
    return resolved


def layer_names(model: nn.Module, layers: Sequence[nn.Module]) -> list[str]:
    """The dotted names of ``layers`` inside ``model`` (``"?"`` for a module that is not inside it)."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names.get(id(layer), "?") for layer in layers]
