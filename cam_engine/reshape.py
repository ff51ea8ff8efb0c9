"""Reshape transforms: turn a layer's output into ``[B, C, h, w]`` activations.

Token grids are inferred from the token count and the size of the input being explained (read from
the running CAM call), never hard-coded: ViT-B/16 at 224 gives 14x14, ViT-L/14 at 224 16x16,
B/32 7x7, L/14@336 24x24, and a 224x320 input to a /16 model 14x20. Pass ``height``/``width``
to force a grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .core import current_input_size

__all__ = [
    "token_grid",
    "vit_reshape_transform",
    "swin_reshape_transform",
    "swinT_reshape_transform",
    "clip_reshape_for",
    "fasterrcnn_reshape_transform",
]

# Prefix tokens to try, most common first: class token; class + distillation (DeiT); none; registers.
_PREFIX_CANDIDATES = (1, 2, 0, 5, 9, 3, 4, 6, 7, 8, 17)


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot reshape a layer output of type {type(output).__name__}")


def _grid_for(tokens: int, input_size: tuple[int, ...] | None) -> tuple[int, int] | None:
    if tokens <= 0:
        return None
    if input_size is None or len(input_size) != 2:
        side = math.isqrt(tokens)
        return (side, side) if side * side == tokens else None
    height, width = input_size
    for patch in range(1, max(height, width) + 1):
        for grid in ((height // patch, width // patch), (-(-height // patch), -(-width // patch))):
            if grid[0] * grid[1] == tokens and grid[0] > 0:
                return grid
        if (height // patch) * (width // patch) < tokens and (-(-height // patch)) * (-(-width // patch)) < tokens:
            break
    return None


def token_grid(
    num_tokens: int, input_size: tuple[int, ...] | None = None, prefix_tokens: int | None = None
) -> tuple[int, int, int]:
    """``(prefix_tokens, grid_h, grid_w)`` for a sequence of ``num_tokens`` tokens.

    ``input_size`` defaults to the size of the input of the running CAM call; without one a square
    grid is assumed. Raises ValueError when no grid fits.
    """
    size = input_size if input_size is not None else current_input_size()
    candidates = (prefix_tokens,) if prefix_tokens is not None else _PREFIX_CANDIDATES
    for prefix in candidates:
        grid = _grid_for(num_tokens - prefix, size)
        if grid is not None:
            return prefix, grid[0], grid[1]
    raise ValueError(
        f"cannot infer a token grid for {num_tokens} tokens at input size {size}; pass height= and width="
    )


def _tokens_to_maps(tokens: torch.Tensor, height: int | None, width: int | None, prefix: int | None):
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens [B, N, C], got shape {tuple(tokens.shape)}")
    count = tokens.shape[1]
    if height is not None and width is not None:
        prefix = count - height * width
        if prefix < 0:
            raise ValueError(f"{count} tokens cannot fill a {height}x{width} grid")
    else:
        prefix, height, width = token_grid(count, prefix_tokens=prefix)
    grid = tokens[:, prefix:, :].reshape(tokens.shape[0], height, width, tokens.shape[2])
    return grid.permute(0, 3, 1, 2)


def vit_reshape_transform(output: Any, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """ViT-style tokens ``[B, prefix + h*w, C]`` -> ``[B, C, h, w]``; prefix (class, distillation,
    register) tokens are dropped. Works for timm and torchvision ViTs and DeiT."""
    return _tokens_to_maps(_first_tensor(output), height, width, None)


def clip_reshape_for(vision_config: Any):
    """A CLIP reshape with the grid taken from a vision config's ``image_size`` and ``patch_size``."""
    side = int(vision_config.image_size) // int(vision_config.patch_size)

    def reshape(output: Any) -> torch.Tensor:
        tokens = _first_tensor(output)
        if tokens.shape[1] == side * side + 1:
            return _tokens_to_maps(tokens, side, side, 1)
        return _tokens_to_maps(tokens, None, None, 1)  # interpolated position embeddings: infer

    return reshape


def swin_reshape_transform(output: Any, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Swin: timm's NHWC maps ``[B, h, w, C]`` or flattened ``[B, h*w, C]`` -> ``[B, C, h, w]``."""
    tensor = _first_tensor(output)
    if tensor.ndim == 4:
        return tensor.permute(0, 3, 1, 2)
    return _tokens_to_maps(tensor, height, width, 0 if height is None else None)


def swinT_reshape_transform(output: Any, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """pytorch-grad-cam's name for [`swin_reshape_transform`][cam_engine.reshape.swin_reshape_transform] (there ``height=width=7`` by
    default; here the grid is inferred unless given)."""
    return swin_reshape_transform(output, height, width)


def fasterrcnn_reshape_transform(features: dict) -> torch.Tensor:
    """FPN feature dict -> one map: every level's absolute value resized to the ``pool`` level's size
    and concatenated along channels."""
    target_size = features["pool"].shape[-2:] if "pool" in features else list(features.values())[-1].shape[-2:]
    maps = [F.interpolate(value.abs(), target_size, mode="bilinear") for value in features.values()]
    return torch.cat(maps, dim=1)
