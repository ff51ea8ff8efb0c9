"""A model cut in two at a target layer, so that the part before it can run on a faster copy.

A gradient CAM needs autograd only after the target layer: everything before it runs without a graph.
[`ForwardSplit`][cam_engine.split.ForwardSplit] hands the engine that cut explicitly, ``prefix(x)`` (the target layer's output) and
``tail(activation)`` (the model's output from there); give it to a CAM as ``cam.forward_split`` and the
engine runs ``prefix`` under ``torch.no_grad`` (``inference_mode`` for gradient-free methods) and only
``tail`` with autograd. ``prefix`` may be any callable computing the same values, e.g. a frozen
TorchScript copy of the prefix (``handlers.fast_forward`` serves explanations that way).

[`split_at`][cam_engine.split.split_at] builds the cut with ``torch.fx`` for models that trace symbolically (torchvision and
timm CNNs do) when the cut is clean: the target layer is called exactly once and the part after it reads
nothing computed before it except the layer's output (no skip connection across the cut, no use of the
input). Otherwise it returns None and the engine's ordinary hooked forward pass is the way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = ["ForwardSplit", "split_at"]


@dataclass(frozen=True)
class ForwardSplit:
    """``model(x) == tail(prefix(x))`` with ``prefix(x)`` the output of ``layer``.

    ``layer``: the module the model is cut after (a CAM uses the split only when this is its one target
    layer). ``prefix``: ``[B, C, *S]`` input -> ``layer``'s output (run without gradients). ``tail``: that
    output -> the model's output (run with autograd for gradient methods). Both read the model's own
    modules: build the split after any change to the model's structure.
    """

    layer: nn.Module
    prefix: Callable[[torch.Tensor], Any]
    tail: Callable[[Any], Any]


class _LeafTracer(fx.Tracer):
    """fx's tracer with ``layer`` kept as one call (it may be a custom module fx would trace through)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return module is self.layer or super().is_leaf_module(module, qualified_name)


def _graphs(graph: fx.Graph, cut: fx.Node) -> tuple[fx.Graph, fx.Graph] | None:
    nodes = list(graph.nodes)
    position = nodes.index(cut)
    prefix, env = fx.Graph(), {}
    for node in nodes[: position + 1]:
        env[node] = prefix.node_copy(node, lambda n: env[n])
    prefix.output(env[cut])
    before = set(nodes[:position])
    tail, tail_env = fx.Graph(), {}
    tail_env[cut] = tail.placeholder("activation")

    def arg(node: fx.Node) -> fx.Node:
        if node not in tail_env:
            if node not in before or node.op != "get_attr":
                raise LookupError(node.name)  # the tail reads something the prefix computed
            tail_env[node] = tail.node_copy(node, arg)  # a parameter or constant: fetch it again
        return tail_env[node]

    try:
        for node in nodes[position + 1 :]:
            if node.op == "output":
                tail.output(fx.map_arg(node.args[0], arg))
            else:
                tail_env[node] = tail.node_copy(node, arg)
    except LookupError:
        return None
    return prefix, tail


def split_at(
    model: nn.Module, layer: nn.Module, example: torch.Tensor | None = None, tolerance: float = 1e-5
) -> ForwardSplit | None:
    """``model`` cut after ``layer`` (one of its submodules), or None when no clean cut exists.

    With ``example`` (a batch ``[B, C, *S]`` on the model's device), the split is checked on it: None
    when ``tail(prefix(example))`` differs from ``model(example)`` by more than ``tolerance`` relative to
    the outputs' largest magnitude (or the model does not return one tensor).
    """
    names = {module: name for name, module in model.named_modules()}
    name = names.get(layer)
    if not name:
        return None
    try:
        graph = _LeafTracer(layer).trace(model)
    except Exception:  # noqa: BLE001 - a model fx cannot trace symbolically has no split
        return None
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        return None
    graphs = _graphs(graph, calls[0])
    if graphs is None:
        return None
    prefix, tail = fx.GraphModule(model, graphs[0]), fx.GraphModule(model, graphs[1])
    prefix.graph.eliminate_dead_code()  # what only the tail needed
    prefix.recompile()
    split = ForwardSplit(layer, prefix, tail)
    if example is not None:
        with torch.no_grad():
            expected, got = model(example), split.tail(split.prefix(example))
        if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            return None
        error = float((got - expected).abs().max()) / (float(expected.abs().max()) or 1.0)
        if not error <= tolerance:
            return None
    return split
