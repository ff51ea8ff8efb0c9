"""Architecture registry: a name -> builder of an un-trained ``nn.Module`` (weights come separately).

The handler builds the architecture named in its config and loads the archived state dict into it;
``model_store.build`` uses the same builders. Names registered here are the ones configs use::

    model = build("resnet50", num_classes=1000)
    get_architecture("resnet50").reshape  # 'none'; 'vit' for a ViT: reshape_transform("vit")

``torchvision/<name>`` and ``timm/<name>`` build any model those libraries know, for tests and
experiments; ``ultralytics/<cfg>`` builds a YOLO detector (``ultralytics/yolov8n``, optional package,
see :mod:`handlers.models.yolo`). Each entry also carries the reshape transform its transformer
layers need (``auto``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Architecture",
    "register",
    "build",
    "get_architecture",
    "reshape_transform",
    "load_state",
    "SegmentationLogits",
    "freeze_batch_norm",
]


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: its builder, the reshape its CAM layers need
    (``none``/``vit``/``swin``/``fasterrcnn``) and the state-dict prefixes a full checkpoint has
    that the built model drops (an embedding model's removed classifier head). ``read_checkpoint``
    turns a checkpoint file of another format into a state dict (None: ``torch.load``)."""

    name: str
    builder: Callable[..., nn.Module]
    reshape: str = "none"
    drop_prefixes: tuple[str, ...] = ()
    read_checkpoint: Callable[[Any], Mapping[str, Any]] | None = None


_REGISTRY: dict[str, Architecture] = {}


def register(
    name: str, reshape: str = "none", drop_prefixes: tuple[str, ...] = ()
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``builder(num_classes, **model_options) -> nn.Module`` under ``name``."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = Architecture(name, builder, reshape, drop_prefixes)
        return builder

    return decorate


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def builder(num_classes: int, **options: Any) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)

    return builder


def _timm(name: str) -> Callable[..., nn.Module]:
    def builder(num_classes: int, **options: Any) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, **options)

    return builder


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` under ``module`` by torchvision's ``FrozenBatchNorm2d`` (same
    statistics), in place: torchvision builds its COCO detectors that way, so their checkpoints
    (which carry no ``num_batches_tracked``) load strictly. Numerically identical in eval mode."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module


def _detector(name: str) -> Callable[..., nn.Module]:
    """torchvision detectors without any download (``weights_backbone=None``), backbone BN frozen as in
    torchvision's trained models. ``options``: ``min_size``, ``max_size``, ``box_score_thresh``, ...;
    for Faster R-CNN also ``representation_size``: the width of the box head's two MLP layers (1024 in
    torchvision's models; smaller makes tiny test models). Faster R-CNN's box heads become
    :class:`handlers.models.rcnn_heads.DetectionGradientRoIHeads` (same outputs and state dict)."""

    def builder(num_classes: int, **options: Any) -> nn.Module:
        import torchvision
        from torchvision.models.detection.roi_heads import RoIHeads

        from handlers.models.rcnn_heads import DetectionGradientRoIHeads

        representation = options.pop("representation_size", None)
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes, **options)
        if representation is not None:
            from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

            resolution = model.roi_heads.box_roi_pool.output_size[0]
            model.roi_heads.box_head = TwoMLPHead(model.backbone.out_channels * resolution**2, int(representation))
            model.roi_heads.box_predictor = FastRCNNPredictor(int(representation), num_classes)
        freeze_batch_norm(model.backbone)
        heads = getattr(model, "roi_heads", None)
        if heads is not None and type(heads) is RoIHeads:
            heads.__class__ = DetectionGradientRoIHeads  # same module, a box's gradient through its own row only
        return model

    return builder


class SegmentationLogits(nn.Module):
    """A torchvision segmentation model (DeepLabV3, FCN) returning ``out`` only: ``[B, C, H, W]`` logits
    at the input's size. Same submodules and state-dict keys as the wrapped model (``backbone.*``,
    ``classifier.*``, ``aux_classifier.*``), so its checkpoints load strictly and layer paths match
    the torchvision model's (``backbone.layer4``); the auxiliary head is kept but not run."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.classifier = model.classifier
        self.aux_classifier = getattr(model, "aux_classifier", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        logits = self.classifier(features["out"])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _segmenter(name: str) -> Callable[..., nn.Module]:
    def builder(num_classes: int, **options: Any) -> nn.Module:
        import torchvision

        options.setdefault("aux_loss", False)
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes, **options)
        return SegmentationLogits(model)

    return builder


def _embedder(name: str, head: str) -> Callable[..., nn.Module]:
    """A torchvision classifier with its head ``head`` replaced by ``Identity``: ``[B, D]`` embeddings."""

    def builder(num_classes: int = 0, **options: Any) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, **options)
        parent, _, attribute = head.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attribute, nn.Identity())
        return model

    return builder


for _name in ("resnet18", "resnet50", "vgg16", "densenet121", "mobilenet_v3_large", "mnasnet1_0"):
    register(_name)(_torchvision(_name))
register("vit_b_16", reshape="vit")(_torchvision("vit_b_16"))
register("efficientnet_lite0")(_timm("efficientnet_lite0"))
register("deit_small", reshape="vit")(_timm("deit_small_patch16_224"))
register("swin_tiny", reshape="swin")(_timm("swin_tiny_patch4_window7_224"))
for _name in ("fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn",
              "retinanet_resnet50_fpn"):  # fmt: skip
    register(_name, reshape="fasterrcnn")(_detector(_name))
for _name in ("deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "fcn_resnet50"):
    register(_name)(_segmenter(_name))
register("resnet18_embedding", drop_prefixes=("fc.",))(_embedder("resnet18", "fc"))
register("resnet50_embedding", drop_prefixes=("fc.",))(_embedder("resnet50", "fc"))
register("mobilenet_v3_small_embedding", drop_prefixes=("classifier.",))(_embedder("mobilenet_v3_small", "classifier"))


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
    if model_name and library == "ultralytics":
        from handlers.models import yolo

        return Architecture(
            name,
            lambda num_classes, **options: yolo.build_yolo(name, num_classes, **options),
            read_checkpoint=yolo.read_checkpoint,
        )
    raise KeyError(
        f"unknown architecture {name!r}; registered: {', '.join(sorted(_REGISTRY))} "
        "(or torchvision/<name>, timm/<name>, ultralytics/<yolo config>)"
    )


def build(name: str, num_classes: int, **options: Any) -> nn.Module:
    """A randomly initialised ``name`` with ``num_classes`` outputs, in eval mode.

    ``options`` go to the builder (the config's ``model_options``)."""
    return get_architecture(name).builder(num_classes, **options).eval()


def load_state(
    model: nn.Module, path: Path, state: Mapping[str, Any] | None = None, drop_prefixes: tuple[str, ...] = ()
) -> None:
    """Load the state-dict file ``path`` (or its already-read ``state``) into ``model``, strictly.

    A ``{"state_dict": ...}`` wrapper is unwrapped; keys under ``drop_prefixes`` (an embedding model's
    removed head) are dropped. Raises RuntimeError when the tensors do not fit the model."""
    if state is None:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if drop_prefixes:
        state = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
    model.load_state_dict(state, strict=True)


def reshape_transform(reshape: str) -> Callable[[Any], Any] | None:
    """cam_engine's reshape transform for a ``reshape`` setting ``none``/``vit``/``swin``/``fasterrcnn``
    (``auto`` is resolved by the caller through :func:`get_architecture`); None for ``none``."""
    import cam_engine

    return {
        "none": None,
        "vit": cam_engine.reshape.vit_reshape_transform,
        "swin": cam_engine.reshape.swin_reshape_transform,
        "fasterrcnn": cam_engine.reshape.fasterrcnn_reshape_transform,
    }[reshape]
