"""Drawing the gallery (see :mod:`torchserve_cam_cli.gallery`): each method's CAMs as tiles in a captioned
grid, and several images' grids side by side. Pictures are uint8 RGB ``[h, w, 3]``; CAMs ``[T, H, W]`` in
[0, 1] at the model input, mapped back onto the image through the preprocessing geometry."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["MethodResult", "Gallery", "compose_side_by_side", "render"]

BACKGROUND = (255, 255, 255)
CAPTION_HEIGHT = 34
GAP = 6


@dataclass
class MethodResult:
    """One method's CAMs ``[T, H, W]`` in [0, 1] at the model input (None when it failed) and its time."""

    name: str
    cams: Any = None  # torch.Tensor [T, H, W]
    seconds: float = 0.0
    error: str | None = None
    picture: np.ndarray | None = None  # a ready RGB picture per target [T, h, w, 3] (guided Grad-CAM)


@dataclass
class Gallery:
    """The rendered grid and where each cell's tiles are: ``boxes[name]`` = [(left, top, right, bottom), ...]."""

    image: Image.Image
    boxes: dict[str, list[tuple[int, int, int, int]]] = field(default_factory=dict)
    results: list[MethodResult] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)


def compose_side_by_side(pictures: Sequence[np.ndarray], gap: int = 0) -> np.ndarray:
    """uint8 RGB ``[h_i, w_i, 3]`` pictures -> one ``[H, sum w, 3]``, each resized to the first's height."""
    height = pictures[0].shape[0]
    resized = []
    for picture in pictures:
        if picture.shape[0] != height:
            width = max(1, round(picture.shape[1] * height / picture.shape[0]))
            picture = np.asarray(Image.fromarray(picture).resize((width, height), Image.Resampling.LANCZOS))
        resized.append(picture)
    if gap and len(resized) > 1:
        spacer = np.full((height, gap, 3), 255, dtype=np.uint8)
        resized = [part for picture in resized for part in (picture, spacer)][:-1]
    return np.concatenate(resized, axis=1)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font: same look everywhere
    except (TypeError, OSError):
        return ImageFont.load_default()


def _tile(image: np.ndarray, spec_geometry: Any, cam: Any | None, picture: np.ndarray | None, size: tuple[int, int]) -> Image.Image:
    """One tile ``size`` (w, h): the CAM mapped onto the image (jet overlay), or a ready picture."""
    import torch

    from cam_engine.image import overlay
    from handlers.serving.preprocess import to_source

    width, height = size
    geometry = dataclasses.replace(spec_geometry, source_size=(height, width))
    if picture is not None:  # model-input-sized RGB -> the tile, through the same inverse mapping
        channels = torch.from_numpy(picture.astype(np.float32)).permute(2, 0, 1)
        mapped = to_source(channels, geometry).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0)
        return Image.fromarray(mapped.numpy())
    base = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))
    if cam is None:
        return Image.fromarray(base)
    mapped = to_source(cam[None], geometry)[0]
    return Image.fromarray(overlay(torch.from_numpy(base.copy()), mapped).numpy())


def render(
    image: np.ndarray,
    geometry: Any,
    results: Sequence[MethodResult],
    target_names: Sequence[str],
    title: str,
    tile_height: int = 150,
    max_width: int = 1000,
) -> Gallery:
    """Draw the grid: ``input`` then one cell per method, ``T`` tiles stacked per cell, captions below."""
    tile_width = max(1, round(image.shape[1] * tile_height / image.shape[0]))
    targets = len(target_names)
    cell_w, cell_h = tile_width, targets * tile_height + (targets - 1) * 2 + CAPTION_HEIGHT
    columns = max(1, min(len(results) + 1, (max_width + GAP) // (cell_w + GAP)))
    rows = -(-(len(results) + 1) // columns)
    title_font, font, small = _font(15), _font(13), _font(11)
    header = 26
    canvas = Image.new("RGB", (columns * (cell_w + GAP) + GAP, header + rows * (cell_h + GAP) + GAP), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 5), title, fill=(0, 0, 0), font=title_font)
    gallery = Gallery(canvas, results=list(results))
    cells: list[tuple[str, MethodResult | None]] = [("input", None)] + [(r.name, r) for r in results]
    for position, (name, result) in enumerate(cells):
        left = GAP + (position % columns) * (cell_w + GAP)
        top = header + GAP + (position // columns) * (cell_h + GAP)
        boxes = []
        for t in range(targets):
            box = (left, top + t * (tile_height + 2), left + tile_width, top + t * (tile_height + 2) + tile_height)
            if result is None:
                tile = _tile(image, geometry, None, None, (tile_width, tile_height))
                tile_draw = ImageDraw.Draw(tile)
                label = target_names[t]
                bounds = tile_draw.textbbox((4, 3), label, font=font)
                tile_draw.rectangle((bounds[0] - 3, bounds[1] - 2, bounds[2] + 3, bounds[3] + 2), fill=(0, 0, 0))
                tile_draw.text((4, 3), label, fill=(255, 255, 255), font=font)
            elif result.error is not None:
                tile = Image.new("RGB", (tile_width, tile_height), (225, 225, 225))
                ImageDraw.Draw(tile).multiline_text((4, 4), _wrap(result.error, tile_width, small), fill=(120, 0, 0), font=small)
            else:
                picture = result.picture[t] if result.picture is not None else None
                cam = result.cams[t] if result.cams is not None else None
                tile = _tile(image, geometry, cam, picture, (tile_width, tile_height))
            canvas.paste(tile, box[:2])
            boxes.append(box)
        gallery.boxes[name] = boxes
        caption_top = top + targets * (tile_height + 2) - 2 + 3
        draw.text((left, caption_top), _fit(name, cell_w, font), fill=(0, 0, 0), font=font)
        if result is not None:
            timing = "n/a" if result.error is not None else _duration(result.seconds)
        else:
            timing = "rows: " + ", ".join(target_names) if targets > 1 else "target: " + target_names[0]
        draw.text((left, caption_top + 16), _fit(timing, cell_w, small), fill=(90, 90, 90), font=small)
    return gallery


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _fit(text: str, width: int, font: ImageFont.ImageFont) -> str:
    """``text`` cut with an ellipsis so that it fits ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, width: int, font: ImageFont.ImageFont) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) > width - 8 and line:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    return "\n".join(lines[:8])
