"""Torch's intra-op thread count sized to the CPUs this worker may really use.

torch starts with one intra-op thread per core of the *machine*. In a pod with a CPU limit, on a
shared host, or with several workers/models in one TorchServe, the thread teams of every worker then
fight for the same cores; an OpenMP team whose thread is descheduled stalls at every barrier, and
throughput collapses (measured on a shared 2-core machine: 4.3 req/s with torch's default against 25.8
with one thread per worker, 8 Locust users).

The rule (:func:`plan_threads`):

1. an explicit count wins: ``OMP_NUM_THREADS`` in the worker's environment, else the model-config key
   ``handler.threads``;
2. otherwise ``usable = min(len(os.sched_getaffinity(0)), cgroup quota)`` (cgroup v2 ``cpu.max``,
   v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), one CPU is left to TorchServe's frontend and the
   request path (HTTP, batching, JSON) when there are at least two, and the rest is shared evenly:
   ``threads = max(1, floor((usable - 1) / (workers * models)))``.

What a worker can know, and the assumption made: its own model's workers come from the model-config
(``maxWorkers``, else ``minWorkers``, else 1); the number of models comes from the frontend's command
line (``torchserve --models a.mar b.mar`` or ``all``: the ``.mar`` files and directories of the model
store), which is the worker's parent process on Linux; every other model is assumed to run as many
workers as this one. Models registered later through the management API (off in this project) are
not counted. Without that information a worker assumes it is alone.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from handlers.serving.frontend import models_served

__all__ = [
    "ThreadPlan",
    "cgroup_cpu_limit",
    "usable_cpus",
    "workers_per_model",
    "models_served",
    "plan_threads",
    "configure",
]

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadPlan:
    """The chosen intra-op thread count and what it was derived from.

    ``cpus``: usable CPUs (affinity, capped by the cgroup quota; may be fractional); ``source``:
    ``"OMP_NUM_THREADS"``, ``"handler.threads"`` or ``"sized"``.
    """

    threads: int
    cpus: float
    workers: int
    models: int
    source: str

    def describe(self) -> str:
        if self.source != "sized":
            return f"torch threads: {self.threads} (from {self.source}; {self.cpus:g} usable CPUs)"
        return (
            f"torch threads: {self.threads} (sized: {self.cpus:g} usable CPUs, one left to the frontend when "
            f"there are two or more, shared by {self.workers} worker(s) x {self.models} model(s))"
        )


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[tuple[str, Path]]:
    """(version, directory) candidates holding this process's CPU controller, most specific first."""
    found: list[tuple[str, Path]] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        relative = path.lstrip("/")
        if controllers == "":
            found.append(("v2", root / relative))
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                found.append(("v1", mount / relative))
    found += [("v2", root), ("v1", root / "cpu"), ("v1", root / "cpu,cpuacct")]
    return found


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``1.5`` for ``150000 100000``); None if unlimited."""
    for version, directory in _cgroup_dirs(Path(root), Path(proc_cgroup)):
        try:
            if version == "v2":
                quota, _, period = (directory / "cpu.max").read_text().strip().partition(" ")
                if quota == "max":
                    return None
                return int(quota) / int(period or 100000)
            cfs_quota = int((directory / "cpu.cfs_quota_us").read_text())
            if cfs_quota <= 0:
                return None
            return cfs_quota / int((directory / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
    return None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (> 0, may be fractional)."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, limit)
    return max(cpus, 0.01)


def workers_per_model(model_yaml_config: Mapping[str, Any] | None) -> int:
    """This model's worker count from its model-config: ``maxWorkers``, else ``minWorkers``, else 1."""
    config = model_yaml_config or {}
    for key in ("maxWorkers", "minWorkers"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 1


def _explicit(value: Any) -> int | None:
    try:
        count = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return count if count > 0 else None


def plan_threads(
    model_yaml_config: Mapping[str, Any] | None,
    configured: int | None = None,
    environ: Mapping[str, str] = os.environ,
    cpus: float | None = None,
    models: int | None = None,
) -> ThreadPlan:
    """The intra-op thread count for one worker (see the module docstring for the rule).

    ``configured``: the model-config's ``handler.threads``; ``cpus``/``models`` default to
    :func:`usable_cpus` and :func:`models_served`.
    """
    cpus = usable_cpus() if cpus is None else cpus
    workers = workers_per_model(model_yaml_config)
    models = models_served() if models is None else models
    from_env = _explicit(environ.get("OMP_NUM_THREADS"))
    if from_env is not None:
        return ThreadPlan(from_env, cpus, workers, models, "OMP_NUM_THREADS")
    if configured is not None:
        return ThreadPlan(int(configured), cpus, workers, models, "handler.threads")
    spare = cpus - 1 if cpus >= 2 else cpus
    threads = max(1, math.floor(spare / (workers * models) + 1e-9))
    return ThreadPlan(threads, cpus, workers, models, "sized")


def configure(model_yaml_config: Mapping[str, Any] | None, configured: int | None = None) -> ThreadPlan:
    """Size torch's threads for this worker from its model-config; logs and returns the plan.

    Sets ``torch.set_num_threads``; the inter-op pool (unused by eager models) is set to the same count
    only when torch still allows it (before any inter-op work started in this process).
    """
    chosen = plan_threads(model_yaml_config, configured)
    torch.set_num_threads(chosen.threads)
    try:
        torch.set_num_interop_threads(chosen.threads)
    except RuntimeError:  # already started: torch refuses a second setting
        pass
    logger.info("%s; torch.get_num_threads() = %d", chosen.describe(), torch.get_num_threads())
    return chosen
