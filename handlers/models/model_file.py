"""TorchServe's packaging convention: ``--model-file model.py --serialized-file model.pth``.

An archive built the way every TorchServe example builds one::

    torch-model-archiver --model-name mynet --version 1.0 --model-file model.py \\
        --serialized-file mynet.pth --extra-files index_to_name.json --handler handlers/tasks/classifier.py

is served by our handlers with no ``model-config.yaml``: the one ``nn.Module`` class defined in the model
file is instantiated with no arguments and the state dict loaded into it, as TorchServe's
``BaseHandler._load_pickled_model`` does (same rule: exactly one class defined in the file); labels come
from ``index_to_name.json``; preprocessing is the stock ``image_classifier``'s (resize the shorter side
to 256, centre crop 224, ImageNet mean/std); the target layer is found automatically. A
``--config-file`` with a ``handler:`` section overrides any of it.

The same holds for the detection and segmentation handlers in place of TorchServe's ``object_detector``
and ``image_segmenter``: a torchvision-style detector (``GeneralizedRCNN`` / ``RetinaNet``: a list of
``{"boxes", "labels", "scores"}`` per image) is served as built, its Faster R-CNN box heads given the
detections-only gradient (:mod:`handlers.models.rcnn_heads`); a segmenter may return ``{"out": logits}``
(what ``image_segmenter`` reads) or the logits, at any size: :class:`SegmentationOutput` hands the
segmentation handler ``[B, C, H, W]`` logits at the input's size.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODEL_FILE_ARCHITECTURE", "STOCK_PREPROCESSING", "model_file_defaults", "load_model_class", "build_from_file",
           "SegmentationOutput", "for_task"]

MODEL_FILE_ARCHITECTURE = "model_file"
#: TorchServe's stock image_classifier: Resize(256), CenterCrop(224), ToTensor, Normalize(ImageNet)
STOCK_PREPROCESSING = {"input_size": [224, 224], "resize": "shorter_side", "resize_size": [256, 256], "crop": True,
                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}  # fmt: skip
#: the stock detector / segmenter (ToTensor only): our detection handler needs a fixed input size
STOCK_PREPROCESSING_BY_TASK = {
    "detection": {"input_size": [512, 512], "resize": "letterbox", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
    "segmentation": {"input_size": [520, 520], "resize": "stretch"},
}


def model_file_defaults(manifest: Mapping[str, Any] | None, model_dir: Path, task: str = "classifier") -> dict[str, Any]:
    """The ``handler:`` keys a ``--model-file`` archive implies (empty when the manifest names no model file)."""
    model = dict((manifest or {}).get("model") or {})
    if not model.get("modelFile"):
        return {}
    defaults: dict[str, Any] = {
        "architecture": MODEL_FILE_ARCHITECTURE,
        "preprocessing": dict(STOCK_PREPROCESSING_BY_TASK.get(task, STOCK_PREPROCESSING)),
    }
    if model.get("serializedFile"):
        defaults["weights"] = str(model["serializedFile"])
    if (model_dir / "index_to_name.json").is_file():
        defaults["labels"] = "index_to_name.json"
    return defaults


def load_model_class(path: Path) -> type[nn.Module]:
    """The one class defined in the Python file ``path`` (TorchServe's rule); ValueError otherwise."""
    name = f"_torchserve_cam_model_file_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    directory = str(path.parent)
    added = directory not in sys.path
    if added:  # the model file may import its neighbours, as under TorchServe (model_dir is on sys.path)
        sys.path.insert(0, directory)
    try:
        spec.loader.exec_module(module)
    finally:
        if added:
            sys.path.remove(directory)
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == name]
    modules = [c for c in classes if issubclass(c, nn.Module)]
    if len(modules) != 1:
        found = ", ".join(c.__name__ for c in modules) or "none"
        raise ValueError(f"{path.name} must define exactly one nn.Module class (as TorchServe requires); found {found}")
    return modules[0]


def build_from_file(path: Path) -> nn.Module:
    """An instance of the model file's class, built with no arguments (weights are loaded separately)."""
    if not path.is_file():
        raise ValueError(f"model file {path} does not exist")
    return load_model_class(path)()


class SegmentationOutput(nn.Module):
    """A user's segmenter returning ``[B, C, H, W]`` logits at the input's size (bilinear when smaller).

    The user's module keeps its own ``forward``; its children (and its own parameters and buffers) are
    registered here under the same names, so layer paths (``backbone.3``) and state-dict keys are the
    user's, and hooks on them fire when the user's forward runs. ``{"out": ...}`` (torchvision's and
    ``image_segmenter``'s convention) or a tensor are accepted."""

    wrapped: nn.Module

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "wrapped", model)  # not a submodule: its children are ours
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, parameter in model.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer)

    def train(self, mode: bool = True) -> SegmentationOutput:
        self.wrapped.train(mode)
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.wrapped(x)
        if isinstance(output, Mapping):
            if "out" not in output:
                raise ValueError(f"the segmenter returned a mapping without 'out' (keys {list(output)[:5]})")
            output = output["out"]
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ValueError("a segmenter must return [B, C, H, W] logits or {'out': logits}")
        if output.shape[-2:] != x.shape[-2:]:
            output = F.interpolate(output, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return output


def for_task(model: nn.Module, task: str) -> nn.Module:
    """The user's module as the task handler needs it: a segmenter's output as logits at the input size;
    a Faster R-CNN's ``RoIHeads`` with the detections-only gradient; any other module as built."""
    if task == "segmentation":
        return SegmentationOutput(model)
    if task == "detection":
        from torchvision.models.detection.roi_heads import RoIHeads

        from handlers.models.rcnn_heads import DetectionGradientRoIHeads

        heads = getattr(model, "roi_heads", None)
        if heads is not None and type(heads) is RoIHeads:
            heads.__class__ = DetectionGradientRoIHeads  # same module and state dict, as architectures does
    return model
