"""The test run's budget, printed at its end: wall time per test file and the peak memory of the whole
process tree (pytest and everything it started: TorchServe's frontend and workers, Locust, PostgreSQL,
nginx, subprocess suites).

Memory is summed as PSS from ``/proc/<pid>/smaps_rollup`` (a page shared by N processes counts 1/N in
each), sampled by a daemon thread (every half second, or less often where a sample costs more than a tenth of a
core: reading smaps_rollup walks page tables), so that shared libraries count once. The same thread
adds up the CPU seconds the tree used (user + system, per process since the last sample; a process that lives
less than one sample is missed) and charges them to
the file then running: on a machine shared with other jobs, CPU seconds compare better than wall time. The
PSS of pytest alone at the end of each file shows what a file leaves behind in the test process, after garbage
collection and ``malloc_trim`` (done between files). The budget the
project keeps (``docs/contributing.md``): ``make test`` within 5 minutes and 6 GB PSS on a quiet 2-core
machine. Loaded by ``tests/conftest.py``; ``pytest -p no:tests.helpers.budget`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest


def release_freed_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the system (``malloc_trim``): the models and
    tensors a test file dropped otherwise stay in pytest's heap, fragmented, for the rest of the run."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):  # not glibc
    _LIBC = None


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree[parent].append(int(entry.name))
    return tree


_CLASSIFIED: dict[tuple[int, str], bool] = {}  # (pid, start time) -> started inside the directory


def _started_in(directory: str) -> list[int]:
    """Processes whose working directory or command line is inside ``directory``: the servers a test
    started that detached from pytest (TorchServe's frontend daemonises; pg_ctl and nginx fork away).
    Each process is looked at once (its start time tells a reused PID apart): the sampler stays cheap."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            key = (int(entry.name), (entry / "stat").read_text().rsplit(")", 1)[1].split()[19])
            if key not in _CLASSIFIED:
                cwd = os.readlink(entry / "cwd")
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                _CLASSIFIED[key] = cwd.startswith(directory) or directory in cmdline
        except (OSError, IndexError):
            continue
        if _CLASSIFIED[key]:
            found.append(key[0])
    return found


def _tree(root: int, directory: str | None) -> set[int]:
    tree, seen = _children(), set()
    stack = [root, *(_started_in(directory) if directory else [])]
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack.extend(tree.get(pid, ()))
    return seen


def pss_bytes(pid: int) -> int:
    """PSS of one process in bytes (0 where /proc has no smaps_rollup or it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_WORKER: dict[tuple[int, str], bool] = {}  # (pid, start time) -> a TorchServe Python worker


def _worker_key(pid: int) -> tuple[int, str] | None:
    """(pid, start time) of a TorchServe Python worker, else None (each process's command line read once)."""
    try:
        key = pid, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        if key not in _WORKER:
            _WORKER[key] = b"model_service_worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return None
    return key if _WORKER[key] else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` itself; 0 once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_pss_bytes(root: int, directory: str | None = None) -> int:
    """PSS of ``root``, of the processes started inside ``directory`` and of all their descendants, in bytes
    (0 where /proc has no smaps_rollup); each process counted once."""
    return sum(pss_bytes(pid) for pid in _tree(root, directory))


class Budget:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.started = time.monotonic()
        self.per_file: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.own_pss: dict[str, int] = {}
        self._cpu_seen: dict[int, float] = {}
        self.workers: dict[tuple[int, str], float] = {}  # TorchServe workers seen (pid, start time) -> CPU seconds
        self.started_workers: dict[str, int] = defaultdict(int)  # file -> TorchServe workers first seen during it
        self.peak = (0, "")
        self.current = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="budget-pss", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        factory, pause = None, 0.5
        while not self._stop.wait(pause):
            began = time.process_time()
            factory = factory or getattr(self.config, "_tmp_path_factory", None)  # pytest's, set at configure
            basetemp = str(factory.getbasetemp()) if factory is not None else None
            pids, current = _tree(os.getpid(), basetemp), self.current
            pss = sum(pss_bytes(pid) for pid in pids)
            if pss > self.peak[0]:
                self.peak = (pss, current)
            used = 0.0
            for pid in pids:
                now = cpu_seconds(pid)  # not pytest's reaped children: sampled while alive, they would count twice
                used += max(0.0, now - self._cpu_seen.get(pid, 0.0))
                self._cpu_seen[pid] = now
                worker = _worker_key(pid)
                if worker is not None:
                    if worker not in self.workers:
                        self.started_workers[current.split("::", 1)[0] or "collection"] += 1
                    self.workers[worker] = now
            self.cpu[current.split("::", 1)[0] or "collection"] += used
            # smaps_rollup walks page tables (~60 ms for a TorchServe worker): at most a tenth of a core
            pause = max(0.5, 10 * (time.process_time() - began))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        self.current = item.nodeid
        start = time.monotonic()
        yield
        name = item.nodeid.split("::", 1)[0]
        self.per_file[name] += time.monotonic() - start
        if nextitem is None or nextitem.nodeid.split("::", 1)[0] != name:
            release_freed_memory()  # between files: what a file dropped leaves pytest (~0.3-0.5 GB by the end)
            self.own_pss[name] = pss_bytes(os.getpid())

    def pytest_terminal_summary(self, terminalreporter) -> None:
        self._stop.set()
        if not self.per_file:
            return
        wall = time.monotonic() - self.started
        write = terminalreporter.write_line
        shown = None if os.environ.get("BUDGET_FILES") == "all" else 12
        terminalreporter.section(f"budget: wall time per file ({'all' if shown is None else 'slowest 12; BUDGET_FILES=all for every file'}) and peak memory")
        write("   wall    CPU  pytest PSS after  workers started")
        for name, seconds in sorted(self.per_file.items(), key=lambda kv: -kv[1])[:shown]:
            write(f"{seconds:7.1f}{self.cpu.get(name, 0.0):7.1f} s {self.own_pss.get(name, 0) / 2**30:5.2f} GiB"
                  f" {self.started_workers.get(name, 0):3d}  {name}")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        write(f"CPU of the tree {sum(self.cpu.values()):.0f} s (set-up before the first test"
              f" {self.cpu.get('collection', 0.0):.0f} s); load average {load:.1f} at the end")
        write(f"TorchServe workers started {len(self.workers)}, their CPU {sum(self.workers.values()):.0f} s"
              f" (each starts with ~5 CPU-s of imports: torch, torchvision)")
        write(f"session {wall:.0f} s wall; peak PSS of pytest and its children {self.peak[0] / 2**30:.2f} GiB"
              f" (during {self.peak[1] or 'collection'})")


def pytest_configure(config: pytest.Config) -> None:
    if Path("/proc/self/smaps_rollup").exists() and not hasattr(config, "workerinput"):
        config.pluginmanager.register(Budget(config), "budget-report")
