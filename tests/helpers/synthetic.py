"""Synthetic localisation data and tiny models trained on it in seconds (no downloads).

Each image is a grey noisy background with one filled shape (square, disc or cross) at a random
place; the class is the shape's colour (reddish, greenish, bluish). The background carries no colour,
so the only evidence for the class lies on the object: a model must look there to classify.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import timm
import torch
from torch import nn

from tests.helpers.gradcam_suite import cache_dir as cache_root

CLASSES = ("red", "green", "blue")
SHAPES = ("square", "disc", "cross")


def make_shapes(count: int, size: int = 64, seed: int = 0, shape_size: tuple[int, int] = (14, 22)):
    """``count`` images ``[N, 3, size, size]`` (float, roughly unit scale), labels ``[N]`` and the
    shapes' boxes ``[N, 4]`` as ``(x0, y0, x1, y1)`` pixel bounds (exclusive ends)."""
    generator = torch.Generator().manual_seed(seed)
    images = (torch.rand(count, 1, size, size, generator=generator) * 0.8).expand(count, 3, size, size).clone()
    labels = torch.randint(0, len(CLASSES), (count,), generator=generator)
    kinds = torch.randint(0, len(SHAPES), (count,), generator=generator)
    boxes = torch.zeros(count, 4, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(count):
        side = int(torch.randint(shape_size[0], shape_size[1] + 1, (1,), generator=generator))
        x0 = int(torch.randint(0, size - side + 1, (1,), generator=generator))
        y0 = int(torch.randint(0, size - side + 1, (1,), generator=generator))
        local_x, local_y = xx - x0, yy - y0
        inside = (local_x >= 0) & (local_x < side) & (local_y >= 0) & (local_y < side)
        kind = int(kinds[i])
        if kind == 0:
            mask = inside
        elif kind == 1:
            r = side / 2
            mask = (local_x + 0.5 - r) ** 2 + (local_y + 0.5 - r) ** 2 <= r * r
        else:
            third = side / 3
            bar_x = (local_x >= third) & (local_x < 2 * third)
            bar_y = (local_y >= third) & (local_y < 2 * third)
            mask = inside & (bar_x | bar_y)
        colour = 0.3 + 0.3 * torch.rand(3, generator=generator)
        colour[int(labels[i])] = 0.8 + 0.2 * float(torch.rand(1, generator=generator))
        images[i][:, mask] = colour[:, None]
        boxes[i] = torch.tensor([x0, y0, x0 + side, y0 + side])
    return (images - 0.5) / 0.25, labels, boxes


class SmallCNN(nn.Module):
    """Four conv blocks (stride 2 twice) and a global-average-pool head; 16x16 maps at 64x64 input."""

    def __init__(self, classes: int = len(CLASSES)):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(3, 16, 1), block(16, 32, 2), block(32, 64, 2), block(64, 64, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def make_shapes_or_empty(count: int, size: int, seed: int, empty_fraction: float, shape_size=(14, 22)):
    """:func:`make_shapes`, with a share of images replaced by object-free background (label -1)."""
    images, labels, boxes = make_shapes(count, size=size, seed=seed, shape_size=shape_size)
    generator = torch.Generator().manual_seed(seed + 7)
    empty = torch.rand(count, generator=generator) < empty_fraction
    background = (torch.rand(count, 1, size, size, generator=generator) * 0.8).expand(count, 3, size, size)
    images = torch.where(empty[:, None, None, None], (background - 0.5) / 0.25, images)
    labels = torch.where(empty, torch.full_like(labels, -1), labels)
    return images, labels, boxes


def tiny_vit(classes: int = len(CLASSES), size: int = 32) -> nn.Module:
    """A 2-block ViT (patch 4, 8x8 tokens at 32x32) with average pooling and no class token.

    With average pooling (timm applies ``fc_norm`` after the pool) every token of ``blocks.-1`` gets
    the same gradient, so CAM methods there behave like a CNN's last conv layer before its GAP head.
    """
    return timm.models.VisionTransformer(
        img_size=size, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=classes,
        global_pool="avg", class_token=False,
    )


def train(
    model: nn.Module, steps: int, seed: int = 0, batch: int = 64, lr: float = 3e-3, size: int = 64,
    shape_size=(14, 22), one_vs_rest: bool = False,
) -> float:
    """Train on fresh synthetic batches; returns the accuracy on 256 held-out images.

    ``one_vs_rest``: binary cross-entropy per class, with a quarter of each batch object-free and
    labelled all-negative. Softmax cross-entropy only constrains differences between logits, so a
    transformer is free to let the object push its class up through a negative token contribution
    absorbed by the head's bias; then heatmaps point at the background. Requiring every logit to be
    low on background alone pins the object's contribution to be positive.
    """
    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
    model.train()
    for step in range(steps):
        data_seed = 10_000 + seed * steps + step
        if one_vs_rest:
            images, labels, _ = make_shapes_or_empty(batch, size, data_seed, 0.25, shape_size)
            logits = model(images)
            target = nn.functional.one_hot(labels.clamp(min=0), logits.shape[1]).float() * (labels >= 0)[:, None]
            loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
        else:
            images, labels, _ = make_shapes(batch, size=size, seed=data_seed, shape_size=shape_size)
            loss = nn.functional.cross_entropy(model(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    return accuracy(model, size, shape_size)


def accuracy(model: nn.Module, size: int = 64, shape_size=(14, 22)) -> float:
    """The model's accuracy on 256 held-out images (eval mode)."""
    model.eval()
    images, labels, _ = make_shapes(256, size=size, seed=999, shape_size=shape_size)
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def trained(model: nn.Module, **train_args) -> float:
    """``train(model, **train_args)`` once per machine: the weights are kept in the test cache
    (``$TORCHSERVE_CAM_CACHE`` or ``~/.cache/torchserve-cam``, outside the clone, so CI's fresh clones
    reuse them) under a hash of this file, the model's class, the arguments and torch's version, and
    reloaded on the next run. Returns the held-out accuracy, measured on every call, cached or not."""
    cache_dir = cache_root() / "trained-models"
    cache_dir.mkdir(exist_ok=True)
    key = hashlib.sha256(
        "\n".join([Path(__file__).read_text(), type(model).__qualname__, repr(sorted(train_args.items())),
                   torch.__version__]).encode()
    ).hexdigest()[:20]
    path = cache_dir / f"{type(model).__name__}-{key}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return accuracy(model, train_args.get("size", 64), train_args.get("shape_size", (14, 22)))
    result = train(model, **train_args)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model.state_dict(), partial)
    os.replace(partial, path)  # whole or absent, whichever run finishes first
    return result


def peak_in_box(cams: torch.Tensor, boxes: torch.Tensor, margin: int = 0) -> torch.Tensor:
    """Per image, whether the heatmap's maximum lies inside its box (grown by ``margin`` pixels)."""
    cams = torch.as_tensor(cams)
    width = cams.shape[-1]
    flat = cams.reshape(cams.shape[0], -1).argmax(dim=1)
    y, x = flat // width, flat % width
    return (x >= boxes[:, 0] - margin) & (x < boxes[:, 2] + margin) & (y >= boxes[:, 1] - margin) & (y < boxes[:, 3] + margin)


__all__ = ["CLASSES", "SHAPES", "make_shapes", "make_shapes_or_empty", "SmallCNN", "tiny_vit", "train", "peak_in_box"]
