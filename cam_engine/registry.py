"""Name -> CAM class registry: ``create(name, model, target_layers, **options)`` and ``methods()``."""

from __future__ import annotations

from typing import Any

__all__ = ["register", "methods", "get_method", "create"]

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: register a CAM class under its lowercase ``name``."""

    def decorate(cls: type) -> type:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"CAM method {key!r} is already registered")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return decorate


def methods() -> list[str]:
    """The registered method names, in registration order (``gradcam``, ``hirescam``, ...)."""
    return list(_REGISTRY)


def get_method(name: str) -> type:
    """The class registered as ``name``; case-insensitive, and the class name is accepted too."""
    key = str(name).lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    for cls in _REGISTRY.values():
        if cls.__name__.lower() == key:
            return cls
    raise ValueError(f"unknown CAM method {name!r}; available: {', '.join(_REGISTRY)}")


def create(name: str, model, target_layers, **options: Any):
    """Build the CAM method ``name`` for ``model`` at ``target_layers`` (modules or dotted paths).

    ``options`` go to the method's constructor (``reshape_transform``, ``batch_size``, ``k``, ...).
    The object's `explain`/`run` keep results as tensors on the model's device.
    """
    return get_method(name)(model, target_layers, **options)
