"""The engine: hooks, the forward pass, targets, the truncated backward and post-processing.

One call of a CAM method does this, and leaves nothing behind:

1. Forward hooks are registered on the target layers for the duration of the call only.
2. For gradient methods the forward pass runs under ``torch.no_grad()`` up to the first target
   layer; that layer's output is re-entered as a fresh leaf and gradient recording starts there.
   Everything upstream of the target builds no graph, and ``torch.autograd.grad(score, activations)``
   stops at the target layer: parameter gradients are never computed or stored, and the caller's
   ``requires_grad`` flags are never touched. Gradient-free methods run under ``inference_mode``.
3. Targets are evaluated per image and summed, so N images with N targets take one forward and one
   backward pass (images do not interact in eval mode). Several targets per image reuse the forward
   pass and take one extra truncated backward pass each.
4. The CAM is computed in float32 on the model's device (ReLU, min-max scaling, bilinear resize to
   the input size, multi-layer mean), exactly as pytorch-grad-cam defines it.

A model in training mode is switched to eval mode for the call and switched back afterwards.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import functional as CF
from .activations_and_gradients import ActivationsAndGradients
from .extension import GradCamExtension
from .layers import layer_names, resolve_layers
from .model_utils import (
    default_targets,
    eval_mode,
    map_structure,
    model_device_dtype,
    model_scores,
    per_image,
    tensors_of,
)
from .split import ForwardSplit

__all__ = ["BaseCAM", "CAMResult", "PassContext", "current_input_size", "model_scores", "AUGMENTATIONS"]

# (height, width) of the input being explained; reshape transforms read it to infer token grids.
_INPUT_SIZE: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar("input_size", default=None)

# aug_smooth: horizontal flip x brightness 0.9 / 1.0 / 1.1, in the reference's order.
AUGMENTATIONS: tuple[tuple[bool, float], ...] = tuple((flip, f) for flip in (False, True) for f in (0.9, 1.0, 1.1))


def current_input_size() -> tuple[int, ...] | None:
    """The spatial size of the input a CAM call is explaining, or None outside a call."""
    return _INPUT_SIZE.get()


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.requires_grad or not tensor.is_floating_point():
        return tensor
    return tensor.detach().requires_grad_(True)


@dataclass
class Capture:
    """What one forward pass recorded at each target layer."""

    layers: list[nn.Module]
    outputs: dict[int, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a method that runs extra forward passes (ScoreCAM, AblationCAM) needs from the engine.

    ``input``: the batch ``[B, C, *S]`` on the model's device in the model's dtype. ``scores``: the
    capture pass's `model_scores`. ``capture``: the raw target-layer outputs. ``targets[i]``:
    the targets of image ``i``; ``pairs``: the (image, target index) rows of the result, image-major.
    """

    input: torch.Tensor
    scores: Any
    capture: Capture
    targets: list[list[Any]]
    pairs: list[tuple[int, int]]


@dataclass
class CAMResult:
    """The result of [`BaseCAM.run`][cam_engine.core.BaseCAM.run].

    ``cams``: float32 ``[N, H, W]`` in [0, 1] on the model's device, one row per (image, target) pair
    in ``pairs`` (image-major). ``outputs``: the model's output for the batch, detached.
    ``targets``: per image, the targets explained.
    """

    cams: torch.Tensor
    pairs: list[tuple[int, int]]
    outputs: Any
    targets: list[list[Any]]


class BaseCAM(GradCamExtension):
    """A CAM method bound to a model and its target layers.

    The engine's extension points, for methods written against cam_engine (public, documented,
    and what the built-in methods override):

    * [`cam_image`][cam_engine.core.BaseCAM.cam_image] - one layer's CAM from activations and gradients (most methods);
    * [`pass_cam`][cam_engine.core.BaseCAM.pass_cam] - for gradient-free methods that run extra forward passes (ScoreCAM);
    * [`target_gradients`][cam_engine.core.BaseCAM.target_gradients] / [`batched_target_gradients`][cam_engine.core.BaseCAM.batched_target_gradients] - how gradients at the target
      layers are taken (ShapleyCAM adds a Hessian-vector product);
    * [`forward_context`][cam_engine.core.BaseCAM.forward_context] - a context the forward pass runs in;
    * [`resolve_targets`][cam_engine.core.BaseCAM.resolve_targets] - the targets when the caller gives none (FinerCAM);
    * [`aggregate_layers`][cam_engine.core.BaseCAM.aggregate_layers] - how per-layer CAMs combine (RefineCAM multiplies them);
    * [`explain_batch`][cam_engine.core.BaseCAM.explain_batch] - the whole computation for a batch (FullGrad).

    pytorch-grad-cam's extension points (``get_cam_weights``, ``get_cam_image``, ...) work too, on
    the extension path described in `cam_engine.extension`.

    The drop-in call ``cam(input_tensor, targets)`` returns NumPy ``[B, H, W]``; [`explain`][cam_engine.core.BaseCAM.explain]
    returns the same as a tensor on the model's device; [`run`][cam_engine.core.BaseCAM.run] also returns the model's
    outputs from the same forward pass and accepts several targets per image.

    ``volume_resize``: how 3-D CAMs are resized to the input (``"zoom"``, grad-cam's
    ``scipy.ndimage.zoom``, by default; ``"trilinear"`` on the device).

    ``forward_split``: an optional [`cam_engine.split.ForwardSplit`][cam_engine.split.ForwardSplit] at the one target layer (see
    [`cam_engine.split.split_at`][cam_engine.split.split_at]). With it the forward pass is ``tail(prefix(x))``: ``prefix`` runs
    without gradients (it may be a frozen or otherwise optimised copy), only ``tail`` with autograd; the
    CAMs are the same. Ignored when the target layers are not exactly ``[forward_split.layer]``.
    """

    #: registry name, set by [`cam_engine.registry.register`][cam_engine.registry.register]
    name: str = ""
    uses_gradients: bool = True
    #: gradient-free methods whose CAM depends on the target through extra forward passes; they
    #: implement [`pass_cam`][cam_engine.core.BaseCAM.pass_cam] instead of [`cam_image`][cam_engine.core.BaseCAM.cam_image]
    uses_extra_passes: bool = False
    #: several targets per image: one vmapped backward pass instead of one pass per target
    batch_target_gradients: bool = True
    AUGMENTATIONS = AUGMENTATIONS
    volume_resize: str = "zoom"
    forward_split: ForwardSplit | None = None

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module | str] | nn.Module | str,
        reshape_transform: Callable[[Any], torch.Tensor] | None = None,
        compute_input_gradient: bool = False,
        uses_gradients: bool | None = None,
        tta_transforms: Any = None,
        detach: bool = True,
    ) -> None:
        self.model = model
        self.target_layers = resolve_layers(model, target_layers)
        self.reshape_transform = reshape_transform
        self.compute_input_gradient = compute_input_gradient
        if uses_gradients is not None:
            self.uses_gradients = uses_gradients
        self.tta_transforms = tta_transforms
        self.detach = detach
        self.device = model_device_dtype(model)[0]
        #: grad-cam's recorder; filled by calls on the extension path (no hooks stay on the model)
        self.activations_and_grads = ActivationsAndGradients(
            model, self.target_layers, reshape_transform, detach, persistent=False
        )

    # ------------------------------------------------------------------ method hooks
    def cam_image(self, activations: torch.Tensor, gradients: torch.Tensor | None, eigen_smooth: bool) -> torch.Tensor:
        """The CAM of one layer before ReLU and scaling: ``[B, C, *S]`` inputs -> ``[B, *S]``."""
        raise NotImplementedError

    def pass_cam(self, context: PassContext, index: int, activations: torch.Tensor, eigen_smooth: bool) -> torch.Tensor:
        """For ``uses_extra_passes`` methods: the CAM of layer ``index`` for every row of ``context.pairs``.

        ``activations``: float32 ``[B, C, *S]`` (after the reshape transform). Returns ``[N, *S]``
        before ReLU and scaling, ``N = len(context.pairs)``.
        """
        raise NotImplementedError

    def target_gradients(self, loss: torch.Tensor, tensors: list[torch.Tensor], retain_graph: bool) -> list[torch.Tensor]:
        """``d loss / d t`` for every captured target-layer tensor ``t`` (zeros where unused)."""
        grads = torch.autograd.grad(loss, tensors, retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]

    def batched_target_gradients(self, losses: list[torch.Tensor], tensors: list[torch.Tensor]) -> list[list[torch.Tensor]] | None:
        """Gradients of several losses (one per target position) from ONE vmapped backward pass.

        ``torch.autograd.grad(stack(losses), tensors, grad_outputs=eye(T), is_grads_batched=True)``:
        the truncated backward runs once over a batch of T cotangents instead of T times. Returns
        None (the caller then loops) when a backward op has no batching rule or the method needs
        second derivatives.
        """
        if not self.batch_target_gradients:
            return None
        stacked = torch.stack([torch.as_tensor(loss).reshape(()) for loss in losses])
        eye = torch.eye(len(losses), device=stacked.device, dtype=stacked.dtype)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # vmap fallbacks warn about speed, not correctness
                grads = torch.autograd.grad(stacked, tensors, grad_outputs=eye, is_grads_batched=True,
                                            retain_graph=True, allow_unused=True)
        except (RuntimeError, NotImplementedError):
            return None
        return [
            [torch.zeros_like(t) if g is None else g[d] for t, g in zip(tensors, grads)] for d in range(len(losses))
        ]

    def forward_context(self) -> contextlib.AbstractContextManager:
        """A context the forward pass runs in (e.g. an attention backend that supports 2nd derivatives)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> BaseCAM:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        # Hooks only live inside a call; release what the extension path recorded. No exception
        # is swallowed (grad-cam swallows IndexError here).
        self.activations_and_grads.release()

    # ------------------------------------------------------------------ public calls
    def __call__(
        self,
        input_tensor: torch.Tensor,
        targets: Sequence[Any] | None = None,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> np.ndarray:
        """pytorch-grad-cam's call: float32 NumPy ``[B, H, W]`` in [0, 1] at the input's size."""
        if self.uses_extension_path():
            if aug_smooth:
                return self.forward_augmentation_smoothing(input_tensor, targets, eigen_smooth)
            return self.forward(input_tensor, targets, eigen_smooth)
        return self.explain(input_tensor, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth).cpu().numpy()

    def explain(
        self,
        input_tensor: torch.Tensor,
        targets: Sequence[Any] | None = None,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> torch.Tensor:
        """CAMs as a float32 tensor ``[B, H, W]`` in [0, 1] on the model's device.

        ``targets``: one target per image, or None for each image's top class.
        """
        if targets is not None:
            targets = list(targets)
            if len(targets) != input_tensor.shape[0]:
                raise ValueError(f"got {len(targets)} targets for a batch of {input_tensor.shape[0]} images")
            targets = [[t] for t in targets]
        return self.run(input_tensor, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth).cams

    def run(
        self,
        input_tensor: torch.Tensor,
        targets: Sequence[Sequence[Any]] | None = None,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> CAMResult:
        """Explain a batch; ``targets[i]`` is the list of targets for image ``i`` (None: top class)."""
        if input_tensor.ndim < 3:
            raise ValueError(f"input_tensor must be batched [B, C, *S], got shape {tuple(input_tensor.shape)}")
        batch = input_tensor.shape[0]
        if targets is not None:
            targets = [list(t) if isinstance(t, (list, tuple)) else [t] for t in targets]
            if len(targets) != batch:
                raise ValueError(f"got target lists for {len(targets)} images in a batch of {batch}")
        device, dtype = model_device_dtype(self.model)
        x = input_tensor.to(device)
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        token = _INPUT_SIZE.set(tuple(x.shape[2:]))
        try:
            with eval_mode(self.model):
                if not aug_smooth:
                    return self.explain_batch(x, targets, eigen_smooth)
                return self._run_augmented(x, targets, eigen_smooth)
        finally:
            _INPUT_SIZE.reset(token)

    # ------------------------------------------------------------------ internals
    def _forward(self, x: torch.Tensor) -> tuple[Any, Capture]:
        capture = Capture(self.target_layers)
        gradients = self.uses_gradients
        split = self.forward_split
        if split is not None and len(self.target_layers) == 1 and self.target_layers[0] is split.layer:
            return self._split_forward(split, x, capture), capture

        def make_hook(index: int):
            def hook(module, inputs, output):
                if gradients:
                    output = map_structure(output, _leaf)
                    torch.set_grad_enabled(True)
                    capture.outputs[index] = output
                    # Downstream in-place ops (DenseNet's relu(inplace=True) after features.-1) must not
                    # touch the leaf: hand the rest of the model a copy, gradients flow back through it.
                    return map_structure(output, lambda t: t.clone() if t.requires_grad else t)
                capture.outputs[index] = output
                return output

            return hook

        handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(self.target_layers)]
        try:
            context = torch.no_grad() if gradients else torch.inference_mode()
            with context, self.forward_context():
                outputs = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        missing = [i for i in range(len(self.target_layers)) if i not in capture.outputs]
        if missing:
            names = layer_names(self.model, [self.target_layers[i] for i in missing])
            raise RuntimeError(f"target layer(s) {', '.join(names)} did not run during the forward pass")
        return outputs, capture

    def _split_forward(self, split: ForwardSplit, x: torch.Tensor, capture: Capture) -> Any:
        """The forward pass as ``tail(prefix(x))``, the prefix's output captured as the target layer's."""
        with self.forward_context():
            if not self.uses_gradients:
                with torch.inference_mode():
                    capture.outputs[0] = split.prefix(x)
                    return split.tail(capture.outputs[0])
            with torch.no_grad():
                output = map_structure(split.prefix(x), _leaf)
            capture.outputs[0] = output
            with torch.enable_grad():  # the same copy as the hooked pass hands on (in-place ops downstream)
                return split.tail(map_structure(output, lambda t: t.clone() if t.requires_grad else t))

    def _activation(self, structure: Any, index: int) -> torch.Tensor:
        if self.reshape_transform is not None:
            tensor = self.reshape_transform(structure)
        elif isinstance(structure, torch.Tensor):
            tensor = structure
        elif isinstance(structure, (list, tuple)) and structure and isinstance(structure[0], torch.Tensor):
            tensor = structure[0]
        else:
            name = layer_names(self.model, [self.target_layers[index]])[0]
            raise ValueError(f"layer {name} returns {type(structure).__name__}; pass a reshape_transform for it")
        if tensor.ndim < 3:
            name = layer_names(self.model, [self.target_layers[index]])[0]
            raise ValueError(f"layer {name} gives activations of shape {tuple(tensor.shape)}; CAMs need [B, C, *S]")
        if tensor.ndim == 3 and self.reshape_transform is None:
            name = layer_names(self.model, [self.target_layers[index]])[0]
            raise ValueError(
                f"layer {name} gives token activations of shape {tuple(tensor.shape)}; pass a reshape_transform "
                "such as cam_engine.reshape.vit_reshape_transform"
            )
        return tensor.float()

    def _grad_structure(self, structure: Any, grads: dict[int, torch.Tensor]) -> Any:
        return map_structure(structure, lambda t: grads.get(id(t), torch.zeros_like(t)))

    def _layer_cams(
        self,
        capture: Capture,
        gradient_maps: dict[int, torch.Tensor] | None,
        rows: torch.Tensor | None,
        size: tuple[int, ...],
        eigen_smooth: bool,
        context: PassContext | None = None,
    ) -> torch.Tensor:
        """Scaled, resized, layer-averaged CAMs ``[N, *size]`` for the batch rows ``rows``.

        With a ``context`` (extra-pass methods) the rows are ``context.pairs``.
        """
        per_layer = []
        for index in range(len(self.target_layers)):
            structure = capture.outputs[index]
            activations = self._activation(structure, index).detach()
            gradients = None
            if gradient_maps is not None:
                gradients = self._activation(self._grad_structure(structure, gradient_maps), index).detach()
            if rows is not None:
                activations = activations[rows]
                gradients = gradients[rows] if gradients is not None else None
            if context is not None:
                cam = self.pass_cam(context, index, activations, eigen_smooth).float().clamp_min(0)
            else:
                cam = self.cam_image(activations, gradients, eigen_smooth).float().clamp_min(0)
            cam = CF.scale_per_image(cam)
            per_layer.append(CF.resize_maps(cam, size, self.volume_resize))
        return self.aggregate_layers(per_layer)

    def aggregate_layers(self, per_layer: list[torch.Tensor]) -> torch.Tensor:
        """Combine the per-layer CAMs (each ``[N, *S]`` in [0, 1], at the input's size) into ``[N, *S]``
        in [0, 1]: the mean of their positive parts, min-max scaled (grad-cam's default)."""
        if len(per_layer) == 1:  # the mean of one map is the map: skip the copy
            return CF.scale_per_image(per_layer[0].clamp_min(0))
        stacked = torch.stack(per_layer, dim=1).clamp_min(0).mean(dim=1)
        return CF.scale_per_image(stacked)

    def resolve_targets(self, outputs: Any, targets: list[list[Any]] | None, batch: int) -> list[list[Any]]:
        """``targets[i]``: image ``i``'s targets; when None, each image's top class (``outputs``: scores)."""
        if targets is None:
            if not self.uses_gradients and not self.uses_extra_passes and not isinstance(outputs, torch.Tensor):
                return [[None] for _ in range(batch)]  # one target-free CAM per image (a detector's EigenCAM)
            return [[t] for t in default_targets(model_scores(outputs), batch)]
        return targets

    def explain_batch(self, x: torch.Tensor, targets: list[list[Any]] | None, eigen_smooth: bool) -> CAMResult:
        """The whole computation for a batch ``x`` ``[B, C, *S]`` (on the model's device, in eval mode):
        forward with the target layers captured, targets resolved, CAMs ``[N, *S]`` per (image, target)."""
        batch = x.shape[0]
        size = tuple(x.shape[2:])
        outputs, capture = self._forward(x)
        scores = model_scores(outputs)
        if isinstance(scores, torch.Tensor) and scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        targets = self.resolve_targets(scores, targets, batch)
        pairs = [(i, t) for i in range(batch) for t in range(len(targets[i]))]
        if not pairs:
            cams = torch.empty((0, *size), device=x.device, dtype=torch.float32)
        elif self.uses_extra_passes:
            # ScoreCAM / AblationCAM: target-dependent CAMs from extra forward passes, which the
            # method runs under inference_mode (the capture pass above already did).
            context = PassContext(x, scores, capture, targets, pairs)
            cams = self._layer_cams(capture, None, None, size, eigen_smooth, context=context)
        elif not self.uses_gradients:
            # A gradient-free CAM does not depend on the target: compute once per image.
            image_cams = self._layer_cams(capture, None, None, size, eigen_smooth)
            cams = image_cams[torch.tensor([image for image, _ in pairs], device=x.device)]
        else:
            tensors = [t for i in range(len(self.target_layers)) for t in tensors_of(capture.outputs[i])]
            tensors = [t for t in tensors if t.requires_grad]
            batched: list = []

            def depth_cams(depth_index: int, images: list[int], losses: list[torch.Tensor]) -> torch.Tensor:
                if depth_index == 0 and len(losses) > 1:
                    batched.append(self.batched_target_gradients(losses, tensors))
                if batched and batched[0] is not None:
                    grads = batched[0][depth_index]
                else:
                    grads = self.target_gradients(losses[depth_index], tensors, retain_graph=depth_index < len(losses) - 1)
                gradient_maps = {id(t): g for t, g in zip(tensors, grads)}
                rows = torch.tensor(images, device=x.device) if len(images) < batch else None
                return self._layer_cams(capture, gradient_maps, rows, size, eigen_smooth)

            cams = self.cams_per_target(scores, targets, size, x.device, depth_cams)
        return CAMResult(cams, pairs, map_structure(outputs, lambda t: t.detach()), targets)

    def cams_per_target(
        self,
        scores: Any,
        targets: list[list[Any]],
        size: tuple[int, ...],
        device: torch.device,
        depth_cams: Callable[[int, list[int], list[torch.Tensor]], torch.Tensor],
    ) -> torch.Tensor:
        """The gradient methods' loop over target positions, shared by the engine and FullGrad.

        Target position ``d`` (the ``d``-th target of each image that has one) has the loss
        ``losses[d] = sum_i targets[i][d](scores[i])``; ``depth_cams(d, images, losses)`` returns the
        CAMs ``[len(images), *size]`` of those images for it. Returns ``[N, *size]`` float32, one row per
        (image, target) pair, image-major.
        """
        batch = len(targets)
        depth = max((len(t) for t in targets), default=0)
        image_sets = [[i for i in range(batch) if len(targets[i]) > d] for d in range(depth)]
        losses = [sum(targets[i][d](per_image(scores, i)).sum() for i in image_sets[d]) for d in range(depth)]
        if depth == 1 and len(image_sets[0]) == batch:  # one target per image: the rows are already in order
            return depth_cams(0, image_sets[0], losses).float()
        row_of = {pair: row for row, pair in enumerate((i, t) for i in range(batch) for t in range(len(targets[i])))}
        cams = torch.empty((len(row_of), *size), device=device, dtype=torch.float32)
        for depth_index, images in enumerate(image_sets):
            layer_cams = depth_cams(depth_index, images, losses)
            for local, image in enumerate(images):
                cams[row_of[(image, depth_index)]] = layer_cams[local]
            del layer_cams
        return cams

    def _run_augmented(self, x: torch.Tensor, targets: list[list[Any]] | None, eigen_smooth: bool) -> CAMResult:
        """aug_smooth: all six augmentations in one batched pass, de-augmented and averaged."""
        batch = x.shape[0]
        augmented = torch.cat([(x.flip(-1) if flip else x) * factor for flip, factor in AUGMENTATIONS])
        aug_targets = None if targets is None else [t for _ in AUGMENTATIONS for t in targets]
        result = self.explain_batch(augmented, aug_targets, eigen_smooth)
        # Rows are image-major within each augmentation block; a block holds the same pair layout only
        # when targets are given. With targets=None each augmented image has exactly one target.
        per_block = len(result.pairs) // len(AUGMENTATIONS)
        blocks = result.cams.reshape(len(AUGMENTATIONS), per_block, *result.cams.shape[1:])
        restored = [b.flip(-1) if flip else b for b, (flip, _) in zip(blocks, AUGMENTATIONS)]
        cams = torch.stack(restored).mean(dim=0)
        pairs = [(image, t) for image, t in result.pairs[:per_block]]
        outputs = map_structure(result.outputs, lambda t: t[: batch] if t.ndim and t.shape[0] == augmented.shape[0] else t)
        if isinstance(result.outputs, list) and len(result.outputs) == augmented.shape[0]:
            outputs = result.outputs[:batch]
        return CAMResult(cams, pairs, outputs, result.targets[:batch])
