"""CAM methods that perturb the input or the activations and watch the score: ScoreCAM, AblationCAM.

Both are gradient-free and target-dependent: the engine's capture pass records the target layer's
activations ``A`` (``[B, C, *S]`` after the reshape transform) and the model's scores, then
`pass_cam` runs the extra forward passes under ``torch.inference_mode`` and returns
``sum_c w_c A_c`` for every (image, target) row. Peak memory of the extra passes is bounded by
``batch_size`` rows at a time, batched across channels *and* images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import functional as CF
from .core import BaseCAM, PassContext, model_scores
from .registry import register
from .targets import ClassifierOutputTarget

__all__ = ["ScoreCAM", "AblationCAM", "ABLATION_VALUE", "row_target_scores", "ablation_order"]

#: AblationCAM's ablation offset (grad-cam 1.5.7 ``AblationLayer``): when a layer's minimum is not 0,
#: the ablated channel of the ``p``-th copy in a chunk is set to ``min - (p + 1) * ABLATION_VALUE``.
ABLATION_VALUE = 1e7
#: The value an ablated channel of a dict output (a detector's FPN levels) is set to, as grad-cam
#: 1.5.7's ``AblationLayerFasterRCNN`` does.
DICT_ABLATION_VALUE = -1000.0


def row_target_scores(scores: Any, images: Sequence[int], targets: list[list[Any]]) -> torch.Tensor:
    """Evaluate each row's image's targets on that row's output.

    ``scores``: the model's scores for ``R`` rows (``[R, ...]``); ``images[r]`` is the image row ``r``
    belongs to; ``targets[i]`` the targets of image ``i``. Returns float32 ``[R, D]`` with
    ``D = max_i len(targets[i])`` (NaN where image ``i`` has fewer targets). Plain
    [`ClassifierOutputTarget`][cam_engine.perturbation.ClassifierOutputTarget] columns are gathered in one indexing op; other targets are
    called per row, as the reference does (``target(output_row)``, summed to a scalar).
    """
    rows = len(images)
    depth = max((len(t) for t in targets), default=0)
    tensor_scores = isinstance(scores, torch.Tensor)
    device = scores.device if tensor_scores else torch.device("cpu")
    out = torch.full((rows, depth), float("nan"), dtype=torch.float32, device=device)
    for d in range(depth):
        members = [r for r in range(rows) if len(targets[images[r]]) > d]
        if not members:
            continue
        column = [targets[images[r]][d] for r in members]
        if tensor_scores and scores.ndim == 2 and all(type(t) is ClassifierOutputTarget for t in column):
            index = torch.tensor(members, device=device)
            categories = torch.tensor([t.category for t in column], device=device)
            out[index, d] = scores[index, categories].float()
        else:
            values = [torch.as_tensor(t(scores[r])).float().sum().to(device) for t, r in zip(column, members)]
            out[torch.tensor(members, device=device), d] = torch.stack(values)
    return out


def _pair_weights(per_image: list[torch.Tensor], pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Stack the channel weights ``[C]`` of each (image, target) row: ``[N, C]``."""
    return torch.stack([per_image[image][:, target] for image, target in pairs])


def _chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


# ---------------------------------------------------------------------------------------------- ScoreCAM
@register("scorecam")
class ScoreCAM(BaseCAM):
    """Score-CAM (Wang et al., CVPR-W 2020): channels weighted by the score of the input they mask.

    For image ``x`` and channel ``c`` of ``A`` (``[B, C, h, w]``):
    ``M_c = up(A_c)`` (bilinear, align_corners=True, to the input's size),
    ``M'_c = (M_c - min M_c) / (max M_c - min M_c + 1e-8)``,
    ``s_c = target(model(x * M'_c))``, ``w = softmax_c(s)``, ``cam = relu(sum_c w_c A_c)``.

    The ``B * C`` masked inputs are never materialised together: they are built and scored
    ``batch_size`` at a time, mixing images in a chunk, so peak memory grows with ``batch_size``
    (``batch_size`` masked inputs and their forward pass), not with ``C``. A channel that is zero
    everywhere gives a zero mask, hence the zero image: it is scored once per call and shared.
    Masked batches are fed in channels-last memory format where the input is 4-D (faster
    convolutions on CPU, same numbers up to float rounding); the caller's model is not touched.
    """

    uses_gradients = False
    uses_extra_passes = True

    def __init__(
        self,
        model: nn.Module,
        target_layers,
        reshape_transform: Callable | None = None,
        batch_size: int = 16,
        channels_last: bool = True,
    ) -> None:
        super().__init__(model, target_layers, reshape_transform)
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = int(batch_size)
        self.channels_last = channels_last

    def _score_rows(self, batch: torch.Tensor, images: Sequence[int], targets: list[list[Any]]) -> torch.Tensor:
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return row_target_scores(model_scores(self.model(batch)), images, targets)

    def channel_scores(self, context: PassContext, activations: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, C, D]`` of the masked inputs (``D`` targets per image, NaN-padded)."""
        x = context.input
        batch, channels = activations.shape[:2]
        size = tuple(x.shape[2:])
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        depth = max(len(t) for t in context.targets)
        flat = activations.reshape(batch * channels, *activations.shape[2:])
        zero = flat.reshape(batch * channels, -1).abs().amax(dim=1) == 0
        out = torch.empty((batch * channels, depth), dtype=torch.float32, device=x.device)
        with torch.inference_mode():
            zero_items = zero.nonzero()[:, 0]
            if len(zero_items):
                # All-zero channel -> zero mask -> zero image: one forward for all of them.
                zero_scores = model_scores(self.model(torch.zeros_like(x[:1])))
                shared = zero_scores.expand(batch, *zero_scores.shape[1:]) if isinstance(zero_scores, torch.Tensor) else None
                if shared is None:
                    shared = model_scores(self.model(torch.zeros_like(x)))
                per_image = row_target_scores(shared, list(range(batch)), context.targets)
                out[zero_items] = per_image[zero_items // channels]
            items = (~zero).nonzero()[:, 0]
            for part in _chunks(len(items), self.batch_size):
                index = items[part]
                images = index // channels
                maps = F.interpolate(flat[index][:, None], size=size, mode=mode, align_corners=True)
                lows = maps.reshape(len(index), -1).amin(dim=1)
                highs = maps.reshape(len(index), -1).amax(dim=1)
                shape = (len(index),) + (1,) * (maps.ndim - 1)
                maps = (maps - lows.reshape(shape)) / (highs - lows + 1e-8).reshape(shape)
                masked = x[images] * maps.to(x.dtype)
                del maps
                out[index] = self._score_rows(masked, images.tolist(), context.targets)
                del masked
        return out.reshape(batch, channels, depth)

    def pass_cam(self, context: PassContext, index: int, activations: torch.Tensor, eigen_smooth: bool) -> torch.Tensor:
        scores = self.channel_scores(context, activations)  # [B, C, D]
        weights = torch.softmax(scores, dim=1)  # softmax over channels, per image and target
        per_image = [weights[i] for i in range(weights.shape[0])]
        pair_weights = _pair_weights(per_image, context.pairs)
        rows = torch.tensor([image for image, _ in context.pairs], device=activations.device)
        return CF.weighted_sum(pair_weights, activations[rows], eigen_smooth)


# ------------------------------------------------------------------------------------------- AblationCAM
def ablation_order(activations: torch.Tensor, ratio_channels_to_ablate: float = 1.0) -> list[int]:
    """The channels AblationCAM ablates for one image, in order (grad-cam 1.5.7's selection).

    ``activations``: ``[C, *S]``. With ratio 1 every channel in order. Otherwise the experimental
    objectness heuristic: ``P = |first principal component of A|`` min-max scaled and thresholded at
    0.01; each channel scores ``sum(P * n_c) / sum(n_c)`` with ``n_c`` its min-max scaled ``|A_c|``;
    the ``int(C * ratio)`` highest-scoring channels, then the ``int(C * ratio)`` lowest. Many scores
    tie, so the order is NumPy's sort of the float32 scores, exactly as the reference's.
    """
    channels = activations.shape[0]
    if ratio_channels_to_ablate == 1.0:
        return list(range(channels))
    projection = CF.project_2d(activations[None].float())[0].abs()
    projection = projection - projection.min()
    projection = projection / projection.max()
    projection = (projection > 0.01).float()
    normalized = activations.float().abs().reshape(channels, -1)
    normalized = normalized - normalized.amin(dim=1, keepdim=True)
    normalized = normalized / normalized.amax(dim=1, keepdim=True)
    scores = (projection.reshape(1, -1) * normalized).sum(dim=1) / normalized.sum(dim=1)
    # Many channels tie (score 1 when the objectness mask covers them): break ties exactly as the
    # reference does, with NumPy's default sort of the float32 scores (NaN, from all-zero channels, last).
    order = np.argsort(scores.detach().cpu().numpy().astype(np.float32)).tolist()
    count = int(channels * ratio_channels_to_ablate)
    return order[::-1][:count] + order[:count]


def _assemble(new_scores: torch.Tensor, original: torch.Tensor, ablated: list[int], channels: int) -> torch.Tensor:
    """Per-channel scores ``[C, D]``: the ablated score where a channel was ablated, else the original.

    Mirrors grad-cam 1.5.7's ``assemble_ablation_scores`` walk over the sorted ablated channels,
    including its behaviour with repeated channels (``0.5 < ratio < 1``).
    """
    order = sorted(range(len(ablated)), key=lambda k: ablated[k])
    result = original[None].repeat(channels, 1)
    pointer = 0
    for channel in range(channels):
        if pointer < len(order) and ablated[order[pointer]] == channel:
            result[channel] = new_scores[order[pointer]]
            pointer += 1
    return result


class _Layout:
    """Where the channels of the reshaped activations ``[B, C, ...]`` live in a layer's raw output.

    A tensor (or a tuple's first tensor) holds them along one axis; a dict of tensors (FPN levels,
    concatenated in order by ``fasterrcnn_reshape_transform``) holds channel ``c`` in the level whose
    channel range contains it. Copies are kept as a list of level tensors ``[n, ...]``.
    """

    def __init__(self, structure: Any, channels: int, axis_of: Callable[[torch.Tensor, int], int]) -> None:
        self.structure = structure
        if isinstance(structure, Mapping) and structure and all(isinstance(v, torch.Tensor) for v in structure.values()):
            self.levels = list(structure.values())
            self.axis = 1
            if sum(level.shape[1] for level in self.levels) != channels:
                raise ValueError(
                    f"the dict output's levels have {[level.shape[1] for level in self.levels]} channels, "
                    f"the reshaped activations {channels}"
                )
        elif isinstance(structure, torch.Tensor):
            self.levels, self.axis = [structure], axis_of(structure, channels)
        elif isinstance(structure, (list, tuple)) and structure and isinstance(structure[0], torch.Tensor):
            self.levels, self.axis = [structure[0]], axis_of(structure[0], channels)
        else:
            raise TypeError(f"AblationCAM cannot ablate a layer output of type {type(structure).__name__}")
        sizes = [level.shape[self.axis] for level in self.levels]
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        self.sizes = sizes

    @property
    def device(self) -> torch.device:
        return self.levels[0].device

    def values(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The value each copy's ablated channel is set to (``[n]``): for a tensor 0, or
        ``min - (p + 1) * 1e7`` (grad-cam's ``AblationLayer``); for a dict ``DICT_ABLATION_VALUE``."""
        raw = self.levels[0]
        if isinstance(self.structure, Mapping):
            return torch.full((len(images),), DICT_ABLATION_VALUE, dtype=raw.dtype, device=raw.device)
        lows = raw.reshape(raw.shape[0], -1).amin(dim=1)[images].float()
        values = torch.where(lows == 0, torch.zeros_like(lows), lows - (positions.float() + 1) * ABLATION_VALUE)
        return values.to(raw.dtype)

    def ablate(self, images: torch.Tensor, channels: torch.Tensor, values: torch.Tensor) -> list[torch.Tensor]:
        """Copies of the images ``images`` with channel ``channels[r]`` of copy ``r`` set to ``values[r]``."""
        copies = []
        for level, offset, size in zip(self.levels, self.offsets, self.sizes):
            level_copies = level.index_select(0, images)
            rows = torch.nonzero((channels >= offset) & (channels < offset + size)).squeeze(1)
            if len(rows):
                view = level_copies.movedim(self.axis, 1)
                view[rows, channels[rows] - offset] = values[rows].reshape((-1,) + (1,) * (view.ndim - 2))
            copies.append(level_copies)
        return copies

    def restore(self, copies: list[torch.Tensor], row: int, image: int) -> None:
        """Copy ``row`` back to image ``image``'s unablated output."""
        for level_copies, level in zip(copies, self.levels):
            level_copies[row] = level[image]

    def replace(self, copies: list[torch.Tensor]) -> Any:
        """The layer output to hand downstream: the structure with its tensors replaced by ``copies``."""
        structure = self.structure
        if isinstance(structure, torch.Tensor):
            return copies[0]
        if isinstance(structure, Mapping):
            return type(structure)(zip(structure.keys(), copies))
        return type(structure)([copies[0], *structure[1:]])


class _ModeFailed(RuntimeError):
    """A shortcut mode gave the wrong number of outputs."""


@register("ablationcam")
class AblationCAM(BaseCAM):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020): channels weighted by the score drop when ablated.

    ``w_c = (y - y_c) / y`` where ``y`` is the target score and ``y_c`` the score with channel ``c``
    of the target layer's output ablated; ``cam = relu(sum_c w_c A_c)``. Ablating sets the channel
    to 0 when the layer's minimum (for that image) is 0, else to ``min - (p + 1) * 1e7`` with ``p``
    the copy's position in its chunk of ``batch_size`` (grad-cam 1.5.7's ``AblationLayer`` /
    ``AblationLayerVit``, whose in-place loop lowers the minimum copy after copy). The channel axis
    of the raw layer output is axis 1, or the last axis for token (``[B, N, C]``) and NHWC outputs
    whose reshape transform moves channels (ViT, Swin): then a channel is ablated in every token,
    as ``AblationLayerVit`` does.

    Only the layers *after* the target run for the ablated copies. A forward hook on the target
    layer returns the batch of ablated activations in place of the layer's output, and the
    upstream part is fed as little as possible, in this order of preference:

    * ``"empty"``: the model runs on an empty batch (``x[:0]``), so nothing upstream costs anything;
      the hook's batch of ablated copies (several images mixed) flows downstream. Works for plain
      feed-forward networks (ResNet, VGG, EfficientNet: the downstream part is a function of the
      target's output alone).
    * ``"broadcast"``: the model runs on the one image (``x[i:i+1]``), once per chunk, and the
      hook's copies broadcast against upstream tensors that bypass the target (a ViT block's
      residual stream: ``x + attn(norm1(x))`` with ``x`` of batch 1).
    * ``"shrunk"``: the image is repeated once per copy, but the target layer itself computes its
      (replaced) output from a 1x1 slice of its input maps. For a model whose downstream part needs
      the per-image bookkeeping of the upstream part (a torchvision detector: the image sizes its RPN
      and box head read), at the cost of the upstream part only; the reference swaps the layer out for
      the same effect.
    * ``"full"``: the image is repeated once per copy and the whole network runs again; used when the
      downstream part cannot be isolated at all.

    The mode is chosen per call and layer by a probe pass (an unablated copy must reproduce the
    original score, and the output batch must equal the number of copies); a mode that raises or
    fails the probe falls back to the next one. ``mode`` forces one. The caller's model is never
    modified (no layer is swapped); the hook lives only during a pass.

    ``ratio_channels_to_ablate < 1`` ablates only the channels chosen by [`ablation_order`][cam_engine.perturbation.ablation_order];
    the others keep the original score (weight 0).
    """

    uses_gradients = False
    uses_extra_passes = True
    MODES = ("empty", "broadcast", "shrunk", "full")

    def __init__(
        self,
        model: nn.Module,
        target_layers,
        reshape_transform: Callable | None = None,
        ablation_layer: Any = None,
        batch_size: int = 32,
        ratio_channels_to_ablate: float = 1.0,
        mode: str | None = None,
        channel_axis: int | None = None,
    ) -> None:
        # grad-cam's built-in ablation layers select the engine's batched ablation (same values; the
        # channel axis is inferred, or ``channel_axis``); any other layer is used as grad-cam uses it
        # (see cam_engine.ablation_layer).
        super().__init__(model, target_layers, reshape_transform)
        self.ablation_layer = ablation_layer
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if mode is not None and mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES} or None, got {mode!r}")
        self.batch_size = int(batch_size)
        self.ratio_channels_to_ablate = float(ratio_channels_to_ablate)
        self.mode = mode
        self.channel_axis = channel_axis
        #: the mode each target layer ran with in the last call (for inspection and tests)
        self.last_modes: dict[int, str] = {}

    # -------------------------------------------------------------------------------- helpers
    def _axis(self, raw: torch.Tensor, channels: int) -> int:
        if self.channel_axis is not None:
            return self.channel_axis % raw.ndim
        if raw.ndim >= 3 and raw.shape[1] == channels and (self.reshape_transform is None or raw.shape[-1] != channels):
            return 1
        if raw.shape[-1] == channels:
            return raw.ndim - 1
        if raw.shape[1] == channels:
            return 1
        raise ValueError(
            f"cannot find {channels} channels in a layer output of shape {tuple(raw.shape)}; pass channel_axis"
        )

    @contextlib.contextmanager
    def _inject(self, layer: nn.Module, replacement: Any, shrink: bool = False) -> Iterator[None]:
        """The target layer returns ``replacement`` (or ``replacement(output)`` for a callable); with ``shrink``
        it computes its (discarded) output from a 1x1 slice of each image-like input, not the full maps."""
        handles = [layer.register_forward_hook(
            lambda module, inputs, output: replacement(output) if callable(replacement) else replacement)]
        if shrink:
            handles.append(layer.register_forward_pre_hook(lambda module, inputs: tuple(
                t[(slice(None), slice(None)) + (slice(0, 1),) * (t.ndim - 2)]
                if isinstance(t, torch.Tensor) and t.ndim >= 4 else t
                for t in inputs)))  # fmt: skip
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _downstream(
        self, mode: str, index: int, context: PassContext, layout: _Layout, copies: list[torch.Tensor], images: list[int]
    ) -> Any:
        """Model scores ``[n, ...]`` with the target layer's output replaced by the ``n`` ablated ``copies``."""
        x = context.input
        if mode == "empty":
            feed = x[:0]
        elif mode == "broadcast":
            if len(set(images)) != 1:
                raise ValueError("broadcast mode runs one image per pass")
            feed = x[images[0] : images[0] + 1]
        else:  # "shrunk" and "full": the images, repeated
            feed = x[torch.tensor(images, device=x.device)]
        with self._inject(self.target_layers[index], layout.replace(copies), shrink=mode == "shrunk"):
            scores = model_scores(self.model(feed))
        rows = scores.shape[0] if isinstance(scores, torch.Tensor) else len(scores)
        if rows != copies[0].shape[0]:
            raise _ModeFailed(f"{mode}: {rows} outputs for {copies[0].shape[0]} ablated copies")
        return scores

    def _probe(self, mode: str, index: int, context: PassContext, layout: _Layout, image: int, first_channel: int,
               want: torch.Tensor) -> bool:
        """Does ``mode`` reproduce ``image``'s scores ``want`` (``[D]``) from an unablated copy (next to an
        ablated one)?"""
        try:
            device = layout.device
            images = torch.full((2,), image, dtype=torch.long, device=device)
            channels = torch.full((2,), first_channel, dtype=torch.long, device=device)
            copies = layout.ablate(images, channels, layout.values(images, torch.zeros(2, device=device)))
            layout.restore(copies, 0, image)
            scores = self._downstream(mode, index, context, layout, copies, [image, image])
            got = row_target_scores(scores, [image, image], context.targets)[0]
        except Exception:  # noqa: BLE001 - any failure of a shortcut mode means: use the next one
            return False
        scale = max(1.0, float(want.abs().nan_to_num().max()))
        return bool(torch.allclose(got, want, rtol=1e-3, atol=1e-4 * scale, equal_nan=True))

    # ------------------------------------------------------------------------------------ main
    def channel_scores(
        self, context: PassContext, index: int, activations: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ablated scores ``[B, C, D]`` (the original score for channels not ablated) and the
        original scores ``[B, D]``."""
        batch, channels = activations.shape[:2]
        layout = _Layout(context.capture.outputs[index], channels, self._axis)
        original = row_target_scores(context.scores, list(range(batch)), context.targets)  # [B, D]
        orders = [ablation_order(activations[i], self.ratio_channels_to_ablate) for i in range(batch)]
        # items: (image, channel, position of the copy in the reference's chunk of batch_size)
        items = [(i, c, k % self.batch_size) for i in range(batch) for k, c in enumerate(orders[i])]
        new = torch.empty((len(items), original.shape[1]), dtype=torch.float32, device=original.device)
        with torch.inference_mode():
            candidates = [self.mode] if self.mode is not None else list(self.MODES)
            probe_image = next(i for i in range(batch) if context.targets[i])  # pairs exist: some image has targets
            first = orders[probe_image][0] if orders[probe_image] else 0
            mode = next(
                (m for m in candidates[:-1]
                 if self._probe(m, index, context, layout, probe_image, first, original[probe_image])),
                candidates[-1],
            )
            self.last_modes[index] = mode
            if mode == "broadcast":
                groups = [[k for k, item in enumerate(items) if item[0] == i] for i in range(batch)]
                parts = [group[s] for group in groups for s in _chunks(len(group), self.batch_size)]
            else:
                parts = [list(range(len(items)))[s] for s in _chunks(len(items), self.batch_size)]
            device = layout.device
            item_images = torch.tensor([item[0] for item in items], dtype=torch.long, device=device)
            item_channels = torch.tensor([item[1] for item in items], dtype=torch.long, device=device)
            item_values = layout.values(
                item_images, torch.tensor([item[2] for item in items], dtype=torch.long, device=device)
            )
            for part in parts:
                images = [items[k][0] for k in part]
                select = torch.tensor(part, dtype=torch.long, device=device)
                copies = layout.ablate(item_images[select], item_channels[select], item_values[select])
                scores = self._downstream(mode, index, context, layout, copies, images)
                new[select.to(new.device)] = row_target_scores(scores, images, context.targets)
                del copies, scores
        starts = np.cumsum([0] + [len(order) for order in orders])
        result = [_assemble(new[starts[i] : starts[i + 1]], original[i], orders[i], channels) for i in range(batch)]
        return torch.stack(result), original

    def uses_custom_ablation_layer(self) -> bool:
        """True when ``ablation_layer`` is a user's layer (grad-cam's three built-in ones set ``engine_native``)."""
        return self.ablation_layer is not None and not vars(type(self.ablation_layer)).get("engine_native", False)

    def layer_channel_scores(self, context: PassContext, index: int, activations: torch.Tensor):
        """[`channel_scores`][cam_engine.perturbation.ScoreCAM.channel_scores] with a user's ``ablation_layer`` driven as grad-cam 1.5.7 drives it: per
        image and chunk, ``set_next_batch`` then ``layer(output)`` replaces the target layer's output."""
        layer, raw = self.ablation_layer, context.capture.outputs[index]
        batch, channels = activations.shape[:2]
        original = row_target_scores(context.scores, list(range(batch)), context.targets)  # [B, D]
        result = []
        with torch.inference_mode():
            for image in range(batch):
                chosen = [int(c) for c in layer.activations_to_be_ablated(activations[image].cpu().numpy(),
                                                                          self.ratio_channels_to_ablate)]
                new = []
                for part in _chunks(len(chosen), self.batch_size):
                    count = part.stop - part.start
                    layer.set_next_batch(input_batch_index=image, activations=raw, num_channels_to_ablate=count)
                    feed = context.input[image : image + 1].repeat(count, *([1] * (context.input.ndim - 1)))
                    with self._inject(self.target_layers[index], layer):  # output -> layer(output)
                        scores = model_scores(self.model(feed))
                    new.append(row_target_scores(scores, [image] * count, context.targets))
                    layer.indices = layer.indices[count:]
                new_scores = torch.cat(new) if new else original[image][None, :0]
                result.append(_assemble(new_scores, original[image], chosen, channels))
        return torch.stack(result), original

    def pass_cam(self, context: PassContext, index: int, activations: torch.Tensor, eigen_smooth: bool) -> torch.Tensor:
        if self.uses_custom_ablation_layer():
            scores, original = self.layer_channel_scores(context, index, activations)
        else:
            scores, original = self.channel_scores(context, index, activations)  # [B, C, D], [B, D]
        weights = (original[:, None, :] - scores) / original[:, None, :]
        per_image = [weights[i] for i in range(weights.shape[0])]
        pair_weights = _pair_weights(per_image, context.pairs).to(activations.device)
        rows = torch.tensor([image for image, _ in context.pairs], device=activations.device)
        return CF.weighted_sum(pair_weights, activations[rows], eigen_smooth)
