"""Architecture registry: a name -> builder of an un-trained ``nn.Module`` (weights come separately).

The handler builds the architecture named in its config and loads the archived state dict into it;
``model_store.build`` uses the same builders. Names registered here are the ones configs use::

    model = build("resnet50", num_classes=1000)
    list_architectures()  # ['densenet121', 'deit_small', 'efficientnet_lite0', ...]

``torchvision/<name>`` and ``timm/<name>`` build any model those libraries know, for tests and
experiments. Each entry also carries the reshape transform its transformer layers need (``auto``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["Architecture", "register", "build", "get_architecture", "list_architectures"]


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: its builder and the reshape its CAM layers need (``none``/``vit``/``swin``)."""

    name: str
    builder: Callable[[int], nn.Module]
    reshape: str = "none"


_REGISTRY: dict[str, Architecture] = {}


def register(name: str, reshape: str = "none") -> Callable[[Callable[[int], nn.Module]], Callable[[int], nn.Module]]:
    """Decorator: register ``builder(num_classes) -> nn.Module`` under ``name``."""

    def decorate(builder: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        _REGISTRY[name] = Architecture(name, builder, reshape)
        return builder

    return decorate


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def builder(num_classes: int) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    return builder


def _timm(name: str) -> Callable[[int], nn.Module]:
    def builder(num_classes: int) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    return builder


for _name in ("resnet18", "resnet50", "vgg16", "densenet121", "mobilenet_v3_large", "mnasnet1_0"):
    register(_name)(_torchvision(_name))
register("vit_b_16", reshape="vit")(_torchvision("vit_b_16"))
register("efficientnet_lite0")(_timm("efficientnet_lite0"))
register("deit_small", reshape="vit")(_timm("deit_small_patch16_224"))
register("swin_tiny", reshape="swin")(_timm("swin_tiny_patch4_window7_224"))


def _reshape_for_library_name(library_name: str) -> str:
    lowered = library_name.lower()
    if "swin" in lowered:
        return "swin"
    if any(key in lowered for key in ("vit", "deit", "beit", "eva")):
        return "vit"
    return "none"


def get_architecture(name: str) -> Architecture:
    """The registered architecture ``name``, or a ``torchvision/<model>`` / ``timm/<model>`` one.

    Raises ``KeyError`` naming the registered architectures for an unknown name.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    library, _, model_name = name.partition("/")
    if model_name and library == "torchvision":
        return Architecture(name, _torchvision(model_name), _reshape_for_library_name(model_name))
    if model_name and library == "timm":
        return Architecture(name, _timm(model_name), _reshape_for_library_name(model_name))
    raise KeyError(
        f"unknown architecture {name!r}; registered: {', '.join(sorted(_REGISTRY))} "
        "(or torchvision/<name>, timm/<name>)"
    )


def build(name: str, num_classes: int) -> nn.Module:
    """A randomly initialised ``name`` with ``num_classes`` outputs, in eval mode."""
    return get_architecture(name).builder(num_classes).eval()


def list_architectures() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)
