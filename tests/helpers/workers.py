"""The session TorchServe's workers, started on demand: memory for the few models a module uses, not all.

Every test archive is registered at start-up with no worker (a ``model_snapshot`` in the session's
``config.properties``: :func:`session_config`).
Before a test module runs, the module-scoped ``server`` fixture (``tests/conftest.py``) scales the models
that module uses to one worker (the scale-workers API, which stays on with the model API off) and, beyond
``capacity`` live workers (``$TEST_SERVER_WORKERS``, 3 by default: about 0.6 GB PSS each), scales the least
recently used others back to none. The models a module uses are the ``serves`` marker's, else every archive
name or ``tests/helpers/serving.py`` constant for one that the module's source names, else all of them.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
import zipfile
from collections import OrderedDict
from pathlib import Path
from types import ModuleType

import yaml

from model_store.serve import Server, wait_ready

CAPACITY = int(os.environ.get("TEST_SERVER_WORKERS", "3"))


def _serving_settings(archive: Path) -> dict[str, int]:
    """The worker settings an archive's own ``model-config.yaml`` gives (TorchServe's defaults where it is silent)."""
    with zipfile.ZipFile(archive) as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        name = (manifest.get("model") or {}).get("configFile")
        given = (yaml.safe_load(mar.read(name)) or {}) if name and name in mar.namelist() else {}
    settings = {"batchSize": int(given.get("batchSize", 1)), "maxBatchDelay": int(given.get("maxBatchDelay", 100))}
    settings.update({key: int(given[key]) for key in ("responseTimeout", "startupTimeout") if key in given})
    return settings


def session_config(base: Path, store: Path, names: list[str], path: Path) -> Path:
    """``base`` plus a ``model_snapshot`` registering every archive with no worker.

    TorchServe reads ``minWorkers: 0`` in an archive or in ``models=`` as "use ``default_workers_per_model``",
    which cannot be 0 either (0 means one per core): every archive would start a worker at start-up (19 of
    them, ~5 CPU-s and 0.6 GB each, stopped again seconds later). A model snapshot restores its counts as
    given, so the snapshot's models start none; it carries each archive's batching, which it would otherwise
    reset."""
    models = {name: {"1.0": {"defaultVersion": True, "marName": f"{name}.mar", "minWorkers": 0, "maxWorkers": 1,
                             **_serving_settings(store / f"{name}.mar")}} for name in names}  # fmt: skip
    snapshot = {"name": "session.cfg", "modelCount": len(models), "created": 0, "models": models}
    path.write_text(base.read_text().rstrip("\n") + "\nmodel_snapshot=" + json.dumps(snapshot) + "\n")
    return path


def _request(server: Server, method: str, path: str, timeout: float = 30) -> object:
    request = urllib.request.Request(f"{server.url('management')}{path}", method=method,
                                     headers=server.headers("management"))  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def _workers(server: Server, name: str) -> list[dict]:
    return [w for version in _request(server, "GET", f"/models/{name}") for w in version.get("workers", [])]


class Workers:
    """Which models of the session TorchServe have a worker; :meth:`ensure` scales them."""

    def __init__(self, server: Server, names: list[str], capacity: int = CAPACITY, timeout: float = 240) -> None:
        self.server, self.names, self.capacity, self.timeout = server, list(names), capacity, timeout
        self.live: OrderedDict[str, None] = OrderedDict()
        deadline = time.monotonic() + timeout
        while True:  # the frontend is up once it lists every model (key_file.json written, models registered)
            try:
                listed = {m["modelName"] for m in _request(server, "GET", "/models?limit=1000")["models"]}
                if set(names) <= listed:
                    break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the session TorchServe did not list {names} within {timeout:.0f} s")
            time.sleep(0.3)
        for name in names:  # an archive made by another tool may start its own worker: count it
            if _workers(server, name):
                self.live[name] = None

    def _scale(self, name: str, count: int) -> None:
        wait = "&synchronous=true" if count == 0 else ""  # stopped before another starts; started in parallel
        _request(self.server, "PUT", f"/models/{name}?min_worker={count}&max_worker={count}{wait}", timeout=120)

    def ensure(self, needed: list[str]) -> None:
        """One READY worker for each of ``needed``; the least recently used others stopped beyond capacity."""
        needed = [name for name in dict.fromkeys(needed) if name in self.names]
        missing = [name for name in needed if name not in self.live]
        for name in list(self.live):
            if len(self.live) + len(missing) <= self.capacity:
                break
            if name not in needed:
                self._scale(name, 0)
                del self.live[name]
        for name in missing:
            self._scale(name, 1)
        wait_ready(self.server, needed, self.timeout)  # also a worker TorchServe is restarting
        for name in needed:
            self.live[name] = None
            self.live.move_to_end(name)


def models_used(module: ModuleType, names: list[str], marker: object = None) -> list[str]:
    """The models ``module`` uses: ``marker.args`` (a ``serves`` marker), else those its source names (an
    archive name, or a constant of tests/helpers/serving.py holding one) or a module-level string holds (a
    name it imported), else every one of ``names``."""
    if marker is not None:
        return list(marker.args)
    from tests.helpers import serving

    constants = {key: value for key, value in vars(serving).items() if key.isupper() and value in names}
    source = Path(module.__file__).read_text()
    words = set(re.findall(r"\w+", source))
    imported = {value for value in vars(module).values() if isinstance(value, str)}  # e.g. a helper's OWN_X
    used = [name for name in names
            if name in words or name in imported or any(v == name for k, v in constants.items() if k in words)]  # fmt: skip
    return used or list(names)
