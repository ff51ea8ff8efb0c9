"""The test run's budget, printed at its end: wall time per test file and the peak memory of the whole
process tree (pytest and everything it started: TorchServe's frontend and workers, Locust, PostgreSQL,
nginx, subprocess suites).

Memory is summed as PSS from ``/proc/<pid>/smaps_rollup`` (a page shared by N processes counts 1/N in
each), sampled every half second by a daemon thread, so that shared libraries count once. The budget the
project keeps (``docs/contributing.md``): ``make test`` within 5 minutes and 6 GB PSS on a quiet 2-core
machine. Loaded by ``tests/conftest.py``; ``pytest -p no:tests.helpers.budget`` turns it off.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest


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


def _started_in(directory: str) -> list[int]:
    """Processes whose working directory or command line is inside ``directory``: the servers a test
    started that detached from pytest (TorchServe's frontend daemonises; pg_ctl and nginx fork away)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(directory) or directory in cmdline:
            found.append(int(entry.name))
    return found


def tree_pss_bytes(root: int, directory: str | None = None) -> int:
    """PSS of ``root``, of the processes started inside ``directory`` and of all their descendants, in bytes
    (0 where /proc has no smaps_rollup); each process counted once."""
    tree, total, seen = _children(), 0, set()
    stack = [root, *(_started_in(directory) if directory else [])]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(tree.get(pid, ()))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


class Budget:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.started = time.monotonic()
        self.per_file: dict[str, float] = defaultdict(float)
        self.peak = (0, "")
        self.current = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="budget-pss", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        factory = None
        while not self._stop.wait(0.5):
            factory = factory or getattr(self.config, "_tmp_path_factory", None)  # pytest's, set at configure
            basetemp = str(factory.getbasetemp()) if factory is not None else None
            pss = tree_pss_bytes(os.getpid(), basetemp)
            if pss > self.peak[0]:
                self.peak = (pss, self.current)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        self.current = item.nodeid
        start = time.monotonic()
        yield
        self.per_file[item.nodeid.split("::", 1)[0]] += time.monotonic() - start

    def pytest_terminal_summary(self, terminalreporter) -> None:
        self._stop.set()
        if not self.per_file:
            return
        wall = time.monotonic() - self.started
        write = terminalreporter.write_line
        terminalreporter.section("budget: wall time per file (slowest 12) and peak memory")
        for name, seconds in sorted(self.per_file.items(), key=lambda kv: -kv[1])[:12]:
            write(f"{seconds:7.1f} s  {name}")
        write(f"session {wall:.0f} s wall; peak PSS of pytest and its children {self.peak[0] / 2**30:.2f} GiB"
              f" (during {self.peak[1] or 'collection'})")


def pytest_configure(config: pytest.Config) -> None:
    if Path("/proc/self/smaps_rollup").exists() and not hasattr(config, "workerinput"):
        config.pluginmanager.register(Budget(config), "budget-report")
