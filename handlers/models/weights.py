"""Reading a weights file into a state dict, with one-line errors that name what to pass instead.

:func:`read_state_dict` refuses, each with one line: a directory (a ``save_pretrained`` directory needs
``architecture: transformers``), a TorchScript file and an ONNX file (explanations hook into the eager
module's layers: neither can be explained), a whole pickled module. :func:`load_strict` loads a state
dict strictly and, when it does not fit, names the first few missing / unexpected / mis-shaped keys
and their counts, never the kilobytes of every key.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["WeightsError", "read_state_dict", "load_strict", "SHOWN_KEYS"]

SHOWN_KEYS = 3  # keys named per kind of mismatch
EAGER_HINT = "save the eager model's state dict (torch.save(model.state_dict(), PATH)) and name its architecture"


class WeightsError(ValueError):
    """A weights file that cannot be loaded into the model; the message is one line naming the fix."""


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(("constants.pkl", "/code/__torch__.py")) or "/code/" in name for name in archive.namelist())


def _is_onnx(path: Path) -> bool:
    if path.suffix.lower() == ".onnx":
        return True
    with open(path, "rb") as handle:
        head = handle.read(64)
    return head[:1] == b"\x08" and (b"pytorch" in head or b"onnx" in head.lower())


def read_state_dict(path: Path) -> Mapping[str, Any]:
    """The state dict in ``path`` (``torch.save`` file or ``.safetensors``); a ``{"state_dict": ...}``
    or ``{"model": ...}`` wrapper is unwrapped. Raises :class:`WeightsError` (one line)."""
    if path.is_dir():
        raise WeightsError(
            f"{path} is a directory: for a Hugging Face save_pretrained directory set architecture: transformers; "
            "otherwise pass the state-dict file inside it"
        )
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_onnx(path):
        raise WeightsError(f"{path.name} is an ONNX model: CAMs hook into the eager PyTorch module, so ONNX cannot be explained; {EAGER_HINT}")  # fmt: skip
    if _is_torchscript(path):
        raise WeightsError(f"{path.name} is a TorchScript file: CAMs hook into the eager module's layers, so TorchScript cannot be explained; {EAGER_HINT}")  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one line naming it
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise WeightsError(f"{path.name} holds a pickled object, not a state dict of tensors; {EAGER_HINT}") from None
        raise WeightsError(f"{path.name} is not a PyTorch state dict ({reason[:160]})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path.name} is not a state dict (a mapping of names to tensors); {EAGER_HINT}")
    return state


def _shown(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def load_strict(model: nn.Module, state: Mapping[str, Any], what: str = "the architecture") -> None:
    """``model.load_state_dict(state, strict=True)``; raises :class:`WeightsError` naming the first keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_shown(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_shown(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({_shown(shapes)})")
        raise WeightsError(
            f"the state dict does not fit {what}: {'; '.join(parts)}; "
            "check the architecture (and model_options / num_classes) the weights were trained with"
        )
    model.load_state_dict(state, strict=True)
