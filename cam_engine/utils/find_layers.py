"""Find and replace sub-modules (pytorch-grad-cam's ``utils.find_layers``). Pre-order over ``_modules``."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

__all__ = [
    "find_layer_predicate_recursive",
    "find_layer_types_recursive",
    "replace_all_layer_type_recursive",
    "replace_layer_recursive",
]


def replace_layer_recursive(model: nn.Module, old_layer: nn.Module, new_layer: nn.Module) -> bool:
    """Put ``new_layer`` where ``old_layer`` is (first match); True when found. Mutates ``model``."""
    for name, layer in model._modules.items():
        if layer == old_layer:
            model._modules[name] = new_layer
            return True
        if layer is not None and replace_layer_recursive(layer, old_layer, new_layer):
            return True
    return False


def replace_all_layer_type_recursive(model: nn.Module, old_layer_type: type | tuple, new_layer: nn.Module) -> None:
    """Replace every sub-module of ``old_layer_type`` with ``new_layer``. Mutates ``model``."""
    for name, layer in model._modules.items():
        if isinstance(layer, old_layer_type):
            model._modules[name] = new_layer
        if layer is not None:
            replace_all_layer_type_recursive(layer, old_layer_type, new_layer)


def find_layer_types_recursive(model: nn.Module, layer_types: Iterable[type]) -> list[nn.Module]:
    """Every sub-module whose exact type is in ``layer_types``."""
    types = tuple(layer_types)
    return find_layer_predicate_recursive(model, lambda layer: type(layer) in types)


def find_layer_predicate_recursive(model: nn.Module, predicate: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """Every sub-module for which ``predicate`` holds, in pre-order."""
    result = []
    for layer in model._modules.values():
        if layer is None:
            continue
        if predicate(layer):
            result.append(layer)
        result.extend(find_layer_predicate_recursive(layer, predicate))
    return result
