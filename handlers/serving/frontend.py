"""What the TorchServe frontend (this worker's parent process) was started with, read once.

The frontend is started as ``java ... org.pytorch.serve.ModelServer ... -f <config.properties> -s <store>
-m a=a.mar ...``. Two things the worker is never told come from there: the ``max_response_size`` the frontend
enforces (:func:`max_response_size`, used by :mod:`handlers.serving.limits`) and how many models it loads at
start-up (:func:`models_served`, used by :mod:`handlers.serving.threads` to share the CPUs). Both read one
:class:`Frontend`, parsed from ``/proc/<ppid>/cmdline`` once per process (:func:`read`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_MAX_RESPONSE_SIZE", "Frontend", "read", "frontend_config", "max_response_size", "models_served"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_RESPONSE_SIZE = 6_553_500
SERVER_CLASS = "org.pytorch.serve.ModelServer"


@dataclass(frozen=True)
class Frontend:
    """The frontend's command line ``argv`` and working directory ``cwd`` (empty / None when unknown)."""

    argv: tuple[str, ...] = ()
    cwd: Path | None = None

    @property
    def is_torchserve(self) -> bool:
        return any(SERVER_CLASS in word for word in self.argv)

    def config_path(self) -> Path | None:
        """The config.properties the frontend runs with (``-f``, else ``TS_CONFIG_FILE``, else its cwd's)."""
        if not self.is_torchserve or self.cwd is None:
            return None
        for flag, value in zip(self.argv, self.argv[1:]):
            if flag in ("-f", "--ts-config-file"):
                path = Path(value)
                return path if path.is_absolute() else self.cwd / path
        for candidate in (os.environ.get("TS_CONFIG_FILE"), self.cwd / "config.properties"):
            if candidate and Path(candidate).is_file():
                return Path(candidate)
        return None


def _read_process(pid: int) -> Frontend:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return Frontend()
    argv = tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    try:
        cwd: Path | None = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        cwd = None
    return Frontend(argv, cwd)


@functools.lru_cache(maxsize=1)
def _parent() -> Frontend:
    return _read_process(os.getppid())


def read(pid: int | None = None) -> Frontend:
    """The frontend process ``pid`` (default: our parent, read once per process)."""
    return _parent() if pid is None else _read_process(pid)


def frontend_config(pid: int | None = None) -> Path | None:
    """The config.properties the TorchServe frontend (process ``pid``, default: our parent) runs with."""
    return read(pid).config_path()


def _properties(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def max_response_size(override: int | None = None, pid: int | None = None) -> tuple[int, str]:
    """``(bytes, where it came from)``: the longest response TorchServe passes on.

    ``override`` (the handler config's ``max_response_size``) wins; then ``TS_MAX_RESPONSE_SIZE`` when the
    frontend's config enables ``enable_envvars_config``; then ``max_response_size`` in that config; then
    TorchServe's default.
    """
    if override is not None:
        return override, "handler.max_response_size"
    path = frontend_config(pid)
    properties: Mapping[str, str] = {}
    if path is not None:
        try:
            properties = _properties(path)
        except OSError as error:
            logger.warning("cannot read TorchServe's config %s: %s", path, error)
    env = os.environ.get("TS_MAX_RESPONSE_SIZE")
    if env and properties.get("enable_envvars_config", "false").lower() == "true":
        try:
            return int(env), "TS_MAX_RESPONSE_SIZE"
        except ValueError:
            pass
    if "max_response_size" in properties:
        try:
            return int(properties["max_response_size"]), f"max_response_size in {path}"
        except ValueError:
            logger.warning("max_response_size in %s is not an integer", path)
    return DEFAULT_MAX_RESPONSE_SIZE, "TorchServe's default max_response_size"


def _model_args(args: Sequence[str]) -> tuple[list[str], str | None]:
    models: list[str] = []
    store: str | None = None
    for position, arg in enumerate(args):
        if arg in ("-s", "--model-store") and position + 1 < len(args):
            store = args[position + 1]
        if arg in ("-m", "--models"):
            for value in args[position + 1 :]:
                if value.startswith("-"):
                    break
                models.append(value)
    return models, store


def models_served(cmdline: Sequence[str] | None = None) -> int:
    """How many models the TorchServe frontend loads at start-up (1 when that cannot be told).

    ``cmdline``: the frontend's arguments; by default the worker's parent process
    (``org.pytorch.serve.ModelServer ... -s <store> -m a=a.mar b=b.mar``). ``-m all`` counts the model
    store's ``.mar`` files and directories.
    """
    args = list(read().argv if cmdline is None else cmdline)
    if SERVER_CLASS not in args and "-m" not in args:
        return 1
    models, store = _model_args(args)
    if [m.lower() for m in models] == ["all"]:
        if store is None:
            return 1
        try:
            entries = [p for p in Path(store).iterdir() if p.suffix == ".mar" or p.is_dir()]
        except OSError:
            return 1
        return max(1, len(entries))
    return max(1, len(models))
