"""Faster forward passes for serving: a frozen, inference-optimised copy of the model for batches that no
request asks to explain; for the eager model that explanations hook into, batch norms folded into the
convolutions before them and channels-last memory.

Measured on EfficientNet-Lite0, one CPU thread (``bench/bench_serving.py`` and the issue-16 notes in the
README): eager 35 ms/image, TorchScript trace (what stock TorchServe serves) 32, channels-last eager 32,
trace + ``torch.jit.freeze`` + ``torch.jit.optimize_for_inference`` (batch norm folded into the
convolutions, MKL-DNN layouts) 22 at batch 1 and 16 at batch 4.

The frozen copy is an optimisation only: it is built at load time, checked against the eager model on a
random batch of two, and dropped (the eager model then answers everything) when tracing fails, the model
does not return one tensor, the device is not a CPU, or the outputs differ by more than ``TOLERANCE``.
Explanations need autograd only after the target layer: :func:`split_explanations` cuts the model there
(:func:`cam_engine.split.split_at`) and gives the CAMs a frozen copy of the part before it (built and
checked like the prediction copy), so an explained batch costs about a frozen forward plus the eager tail,
its truncated backward and the CAM; where the model does not cut cleanly, explanations run the eager model. :func:`fold_batch_norms` folds
every batch norm whose input is exactly the output of the convolution that ran just before it (found by
one hooked forward pass); the batch norm module is replaced in place, under the same name, by what
remains of it (timm's ``BatchNormAct2d``: its drop and activation; a plain ``BatchNorm2d``: identity), so
a target layer such as ``bn2`` still resolves and outputs the same values. The folded model is checked
against the original on a random batch and the fold is undone when they differ (a convolution output
that something else also reads).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from cam_engine.core import BaseCAM
from cam_engine.split import ForwardSplit, split_at

__all__ = ["TOLERANCE", "build_predictor", "fold_batch_norms", "to_channels_last", "prepare", "split_explanations"]

logger = logging.getLogger(__name__)

#: largest absolute difference of the frozen copy's outputs from the eager model's, relative to the
#: outputs' largest magnitude (batch-norm folding changes the float rounding, ~1e-6 relative)
TOLERANCE = 1e-4


def build_predictor(
    model: nn.Module, input_size: tuple[int, ...], device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A frozen, optimised TorchScript copy of ``model`` (eval, fp32, CPU) for inputs ``[B, 3, *input_size]``.

    Returns None (and logs why) when no such copy can stand in for the eager model.
    """
    if device.type != "cpu":
        return None
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes and dtypes != {torch.float32}:
        return None
    example = torch.rand((1, 3, *input_size))
    check = torch.rand((2, 3, *input_size))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example, check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            expected = model(check)
            got = frozen(check)
    except Exception as error:  # noqa: BLE001 - any failure only means: serve with the eager model
        logger.info("no frozen predictor (%s: %s); predictions use the eager model", type(error).__name__, error)
        return None
    if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        logger.info("no frozen predictor: the model does not return one tensor; predictions use the eager model")
        return None
    scale = float(expected.abs().max()) or 1.0
    difference = float((got - expected).abs().max()) / scale
    if not difference <= TOLERANCE:
        logger.warning("frozen predictor differs from the eager model by %.2g (relative); not used", difference)
        return None
    logger.info("predictions use a frozen TorchScript copy (relative difference %.2g)", difference)
    return frozen



class _AfterNorm(nn.Module):
    """What is left of a folded ``BatchNormAct2d``: its dropout and activation (identity for a plain batch norm)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())
        self.train(norm.training)  # in the norm's mode: an eval model stays all eval (no per-call switching)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _conv_norm_pairs(model: nn.Module, input_size: tuple[int, ...]) -> list[tuple[str, str]]:
    """``(conv name, batch-norm name)`` where the norm's input is the output of the conv that ran just before."""
    names = {module: name for name, module in model.named_modules()}
    last: list[Any] = [None, None]  # (conv module, its output)
    pairs: list[tuple[str, str]] = []

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if isinstance(module, nn.Conv2d):
            last[:] = [module, output]
        elif isinstance(module, nn.BatchNorm2d):
            if last[0] is not None and inputs and inputs[0] is last[1] and module.track_running_stats:
                pairs.append((names[last[0]], names[module]))
            last[:] = [None, None]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        with torch.no_grad():
            model(torch.rand((1, 3, *input_size)))
    finally:
        for handle in handles:
            handle.remove()
    return pairs


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def fold_batch_norms(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Fold each eval-mode batch norm into the convolution feeding it, in place; returns how many were folded
    (0 and ``model`` untouched when the folded model's outputs would differ by more than ``TOLERANCE``)."""
    try:
        pairs = _conv_norm_pairs(model, input_size)
    except Exception as error:  # noqa: BLE001 - no fold, the model stays as it is
        logger.info("batch norms not folded (%s: %s)", type(error).__name__, error)
        return 0
    if not pairs:
        return 0
    folded = copy.deepcopy(model)
    for conv_name, norm_name in pairs:
        conv, norm = folded.get_submodule(conv_name), folded.get_submodule(norm_name)
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
        )
        conv.weight, conv.bias = weight.requires_grad_(False), bias.requires_grad_(False)
        _set(folded, norm_name, _AfterNorm(norm))
    check = torch.rand((2, 3, *input_size))
    with torch.no_grad():
        expected, got = model(check), folded(check)
    if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return 0
    difference = float((got - expected).abs().max()) / (float(expected.abs().max()) or 1.0)
    if not difference <= TOLERANCE:
        logger.warning("folding %d batch norms changes the outputs by %.2g (relative); not folded", len(pairs), difference)
        return 0
    for conv_name, norm_name in pairs:
        _set(model, conv_name, folded.get_submodule(conv_name))
        _set(model, norm_name, folded.get_submodule(norm_name))
    logger.info("folded %d batch norms into their convolutions (relative difference %.2g)", len(pairs), difference)
    return len(pairs)


def to_channels_last(model: nn.Module) -> bool:
    """Put ``model``'s 4-d weights in channels-last memory when it has convolutions; True when it did."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    model.to(memory_format=torch.channels_last)
    return True


def prepare(
    model: nn.Module, input_size: tuple[int, int], device: torch.device, fast_forward: bool
) -> tuple[Callable[[torch.Tensor], Any], bool]:
    """``(predict, channels_last)`` for a loaded ``model`` on ``device``: ``predict`` answers unexplained
    batches under ``torch.inference_mode`` (the frozen copy when ``fast_forward`` (the handler class's
    attribute) and one can be built for ``[N, 3, *input_size]``, else the eager model); the eager model gets
    its batch norms folded (CPU) and channels-last weights, and ``channels_last`` tells whether it did
    (explained batches should match)."""
    if not fast_forward:
        return torch.inference_mode()(model), False
    size = tuple(input_size)
    predictor = build_predictor(model, size, device) or model
    if device.type == "cpu" and not model.training:
        fold_batch_norms(model, size)
    return torch.inference_mode()(predictor), to_channels_last(model)


def split_explanations(
    cams: Iterable[Any], model: nn.Module, input_size: tuple[int, int], device: torch.device, fast_forward: bool
) -> bool:
    """Explained batches run the model up to the target layer on a frozen copy too: every cam_engine CAM of ``cams``
    gets a :class:`cam_engine.split.ForwardSplit` whose prefix is a frozen TorchScript copy of the model up
    to its one target layer (:func:`build_predictor` on :func:`cam_engine.split.split_at`'s prefix, checked
    against the eager one), so only the tail after that layer runs eagerly with autograd.

    Only with ``fast_forward`` on a CPU, and only when all cam_engine CAMs share one target
    layer that cuts the model cleanly (Captum's attributions keep the eager model); returns True when the CAMs got the split. Explained batches then stay in the
    default memory format (the frozen prefix takes it): the caller turns channels-last batches off.
    """
    cams = [cam for cam in cams if isinstance(cam, BaseCAM)]  # Captum's methods run eagerly
    if not fast_forward or device.type != "cpu" or not cams:
        return False
    layers = {id(layer): layer for cam in cams for layer in cam.target_layers}
    if len(layers) != 1 or any(len(cam.target_layers) != 1 for cam in cams):
        return False
    layer = next(iter(layers.values()))
    size = tuple(input_size)
    with torch.no_grad():
        split = split_at(model, layer, torch.rand((2, 3, *size)))
    if split is None:
        logger.info("the model does not cut cleanly at its target layer; explanations run the eager model")
        return False
    prefix = build_predictor(split.prefix, size, device)
    if prefix is None:
        return False
    frozen = ForwardSplit(layer, prefix, split.tail)
    for cam in cams:
        cam.forward_split = frozen
    logger.info("explanations run a frozen copy up to the target layer and the eager tail after it")
    return True
