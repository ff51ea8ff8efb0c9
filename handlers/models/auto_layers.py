"""``target_layers: auto``: the CAM layer pytorch-grad-cam's docs recommend, found by tracing one forward.

One dummy forward at the model's input size with a forward hook on every module records, in the
order modules finish, what each returns. Then:

- **ViT-likes** (ViT, DeiT, Swin, BEiT, CLIP towers, Hugging Face ``*Layer`` blocks): the last block
  that holds two LayerNorms (``norm1``/``norm2``, ``layernorm_before``/``layernorm_after``,
  ``ln_1``/``ln_2``) -> its first norm (``blocks.11.norm1``); reshape ``vit`` for ``[B, N, C]`` tokens,
  ``swin`` for NHWC maps.
- **CNNs** (and ConvNeXt, whose blocks hold one norm): the outermost module that returns the last
  spatial feature map before global pooling (a ``[B, C, h, w]`` output with ``h*w > 1``; adaptive
  pooling layers are skipped) -> ``layer4``, ``features``, ``bn2``; reshape ``none``.

Modules called more than once in a forward (a shared ReLU) are never chosen: their hook is ambiguous.

Per task (``task``): a **detector** (torchvision ``GeneralizedRCNN`` / ``RetinaNet``, anything with a
``backbone``) -> ``backbone``, reshape ``fasterrcnn`` when it returns FPN maps (a dict), ``none`` for
one map; a **segmenter** -> the CNN rule above, among the modules inside ``backbone`` when the model
has one (``backbone.16``, ``backbone.layer4``), else among those whose map is not the logits (a map
with as many channels as the output has classes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["AutoLayer", "find_target_layer", "trace_outputs", "reshape_for_output"]

_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class AutoLayer:
    """The chosen layer: its dotted path, the reshape it needs and why (printed by the build)."""

    path: str
    reshape: str
    reason: str

    def describe(self) -> str:
        return f"{self.path} (auto: {self.reason})"


def _tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if isinstance(hidden, torch.Tensor) else None


def trace_outputs(model: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, nn.Module, torch.Tensor]], Counter]:
    """``(name, module, output)`` in the order modules finish during one forward of ``example``, and
    how often each name was called. The root module is left out."""
    finished: list[tuple[str, nn.Module, torch.Tensor]] = []
    calls: Counter = Counter()
    wrapped: set[str] = set()  # modules returning a tuple or a model output: a CNN layer must return a tensor
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(module: nn.Module, inputs: Any, output: Any, name: str = name) -> None:
            calls[name] += 1
            tensor = _tensor(output)
            if tensor is not None:
                finished.append((name, module, tensor))
                if not isinstance(output, torch.Tensor):
                    wrapped.add(name)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    for name in wrapped:
        calls[name] += 1000  # never chosen: cam_engine would need a reshape for it
    return finished, calls


def reshape_for_output(output: torch.Tensor) -> str:
    """``vit`` for tokens ``[B, N, C]``, ``swin`` for NHWC maps, ``none`` for ``[B, C, h, w]``."""
    if output.ndim == 3:
        return "vit"
    if output.ndim == 4 and output.shape[-1] > output.shape[1] and output.shape[1] == output.shape[2]:
        return "swin"  # [B, h, w, C] with a square grid narrower than the channels
    return "none"


def _transformer_layer(finished: list[tuple[str, nn.Module, torch.Tensor]], calls: Counter) -> AutoLayer | None:
    norms = [(name, out) for name, module, out in finished if isinstance(module, nn.LayerNorm) and calls[name] == 1]
    children: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, out in norms:
        children.setdefault(name.rpartition(".")[0], []).append((name, out))
    blocks = [parent for parent, members in children.items() if len(members) >= 2]
    if not blocks:
        return None
    last = max(blocks, key=lambda parent: max(i for i, (n, _, _) in enumerate(finished) if n.startswith(parent + ".")))
    name, output = children[last][0]
    return AutoLayer(name, reshape_for_output(output), f"first norm of the last block, output {list(output.shape[1:])}")


def _cnn_layer(
    finished: list[tuple[str, nn.Module, torch.Tensor]], calls: Counter, keep: Any = None
) -> tuple[AutoLayer, int] | None:
    """The last spatial map's module; ``keep(name, output)`` narrows the candidates (None: all)."""
    chosen = None
    for position, (name, module, output) in enumerate(finished):
        if output.ndim != 4 or output.shape[-2] * output.shape[-1] <= 1 or isinstance(module, _POOLS):
            continue
        if calls[name] != 1 or (keep is not None and not keep(name, output)):
            continue
        chosen = (name, position, output)  # the last one; an enclosing module returning the same map comes later
    if chosen is None:
        return None
    name, position, output = chosen
    height, width = output.shape[-2:]
    return AutoLayer(name, "none", f"last {height}x{width} map before pooling"), position


def _detector_layer(model: nn.Module, example: torch.Tensor) -> AutoLayer:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError("a detector without a backbone module: give target_layers")
    maps: list[Any] = []
    handle = backbone.register_forward_hook(lambda module, inputs, output: maps.append(output))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        handle.remove()
    output = maps[-1] if maps else None
    if isinstance(output, Mapping) and all(isinstance(v, torch.Tensor) and v.ndim == 4 for v in output.values()):
        return AutoLayer("backbone", "fasterrcnn", f"the detector's backbone, {len(output)} feature maps")
    if isinstance(output, torch.Tensor) and output.ndim == 4:
        return AutoLayer("backbone", "none", f"the detector's backbone, {output.shape[-2]}x{output.shape[-1]} map")
    raise ValueError("the detector's backbone returns neither a feature map nor a dict of them: give target_layers")


def _segmenter_keep(model: nn.Module, example: torch.Tensor) -> Any:
    if isinstance(getattr(model, "backbone", None), nn.Module):
        return lambda name, output: name.startswith("backbone.")
    with torch.inference_mode():
        output = model(example)
    output = output.get("out") if isinstance(output, Mapping) else output
    classes = output.shape[1] if isinstance(output, torch.Tensor) and output.ndim == 4 else None
    return lambda name, map_: map_.shape[1] != classes


def find_target_layer(
    model: nn.Module, input_size: tuple[int, int], device: torch.device | str = "cpu", task: str = "classifier"
) -> AutoLayer:
    """The auto CAM layer of ``model`` for inputs ``[1, 3, *input_size]`` (see the module docstring).

    Raises ValueError when the forward has neither transformer blocks nor a spatial map."""
    example = torch.zeros((1, 3, *input_size), device=device)
    if task == "detection":
        return _detector_layer(model, example)
    if task == "segmentation":
        cnn = _cnn_layer(*trace_outputs(model, example), keep=_segmenter_keep(model, example))
        if cnn is None:
            raise ValueError("no spatial feature map before the segmenter's logits: give target_layers")
        return cnn[0]
    finished, calls = trace_outputs(model, example)
    transformer = _transformer_layer(finished, calls)
    if transformer is not None:  # transformer blocks win: their attention maps are 4-D too, but not spatial
        return transformer
    cnn = _cnn_layer(finished, calls)
    if cnn is not None:
        return cnn[0]
    raise ValueError("no spatial feature map or transformer block found in a forward pass: give target_layers")
