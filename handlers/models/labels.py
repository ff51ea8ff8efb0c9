"""The one label reader: what a config's ``labels`` names -> ``list[str]``, index i = class i.

Used by the archive builder and the handler alike, so the two can never disagree::

    read_labels("imagenet")                       # an alias: imagenet, coco, voc, coco80
    read_labels(["cat", "dog"])                   # a list, as given
    read_labels("index_to_name.json", base_dir)   # a JSON file: a list, or {index: name} read BY KEY

A mapping's keys are class indices (``"0"``, ``"1"``, ... in any order, ``sort_keys`` included); a
missing or duplicate index is a :class:`LabelError` naming it. A value may be a name or TorchServe's
``[wnid, name]`` pair (the name is kept). ``labels: checkpoint`` (names inside the weights file) is
resolved by the caller that reads the checkpoint: here it gives None.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from handlers.settings import ConfigError

__all__ = ["LabelError", "ALIASES", "read_labels", "parse_labels", "imagenet_labels", "coco_labels", "voc_labels"]


class LabelError(ConfigError):
    """A labels file or list cannot give one name per class index (``handler.labels: ...``)."""


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's weight metadata (no download)."""
    import torchvision

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def coco_labels() -> list[str]:
    """The 91 COCO detection categories torchvision's detectors use (index 0 ``__background__``)."""
    import torchvision

    return list(torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def voc_labels() -> list[str]:
    """The 21 Pascal VOC categories torchvision's segmentation models use (index 0 ``__background__``)."""
    import torchvision

    return list(torchvision.models.segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.meta["categories"])


def _coco80() -> list[str]:
    from handlers.models.yolo import coco80_labels

    return coco80_labels()


ALIASES = {"imagenet": imagenet_labels, "coco": coco_labels, "voc": voc_labels, "coco80": _coco80}


def _name(value: Any, where: str) -> str:
    """A label value -> its name: a string as is, TorchServe's ``[wnid, name]`` -> name."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return value[-1]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise LabelError(f"{where}: a label must be a name or a [wnid, name] pair, got {value!r}")


def parse_labels(loaded: Any, where: str = "handler.labels") -> list[str]:
    """A parsed labels document (list, or ``{index: name}``) -> names by index. Raises :class:`LabelError`."""
    if isinstance(loaded, Mapping):
        by_index: dict[int, str] = {}
        duplicates, bad = [], []
        for key, value in loaded.items():
            try:
                index = int(str(key).strip())
            except ValueError:
                bad.append(str(key))
                continue
            if index in by_index:
                duplicates.append(index)
            by_index[index] = _name(value, f"{where}[{key!r}]")
        if bad:
            raise LabelError(f"{where}: keys must be class indices, got {', '.join(map(repr, bad[:5]))}")
        if duplicates:
            raise LabelError(f"{where}: duplicate class indices {sorted(set(duplicates))[:10]}")
        count = max(by_index, default=-1) + 1
        missing = [i for i in range(count) if i not in by_index]
        if missing or min(by_index, default=0) < 0:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise LabelError(
                f"{where}: class indices must be 0..{count - 1} with no gap; missing {shown or 'negative keys'}"
            )
        return [by_index[i] for i in range(count)]
    if isinstance(loaded, Sequence) and not isinstance(loaded, str):
        return [_name(value, f"{where}[{i}]") for i, value in enumerate(loaded)]
    raise LabelError(f"{where}: must be a list of names or an {{index: name}} mapping, got {type(loaded).__name__}")


def read_labels(value: Any, base_dir: Path | None = None, where: str = "handler.labels") -> list[str] | None:
    """A config's ``labels`` -> names by index, or None (no labels, or ``checkpoint``).

    ``value``: an alias, a list (or ``{index: name}`` mapping), or a JSON file name relative to
    ``base_dir`` (the archive, or the config's directory at build time)."""
    if value is None or value == "checkpoint":
        return None
    if isinstance(value, str):
        if value in ALIASES:
            return ALIASES[value]()
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise LabelError(f"{where}: file {value!r} not found{f' in {base_dir}' if base_dir else ''} "
                             f"(or an alias: {', '.join(ALIASES)}, checkpoint)")  # fmt: skip
        try:
            loaded = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise LabelError(f"{where}: {path.name} is not JSON ({error})") from None
        return parse_labels(loaded, f"{where} ({path.name})")
    return parse_labels(value, where)
