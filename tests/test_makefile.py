"""The Makefile's recipes, read with ``make -n`` (nothing runs): what `make serve` installs, how ports and
options reach the tools. Fast, no server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def dry_run(*targets: str, **variables: str) -> str:
    """The commands ``make -n targets`` would run, on a venv that does not exist (so every install shows)."""
    settings = {"VENV": "/nonexistent/venv", **variables}
    command = ["make", "-n", "-C", str(ROOT), *targets, *(f"{k}={v}" for k, v in settings.items())]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


def pip_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " -m pip install" in line]


def test_serve_installs_only_what_serving_needs_and_shows_progress() -> None:
    lines = pip_lines(dry_run("serve"))
    assert lines, "make serve installs nothing on a fresh venv"
    assert not any(" -q" in line.split() or "--quiet" in line for line in lines), lines
    assert not any("[" in line for line in lines), f"make serve installs extras: {lines}"
    assert any(line.rstrip().endswith("-e . --config-settings editable_mode=compat") for line in lines)


def test_serving_dependencies_hold_no_test_tools_nor_agpl_code() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    for name in ("ultralytics", "pytest", "grad-cam", "locust", "ruff", "playwright"):
        assert name not in core, f"{name} is a core dependency: `make serve` would install it"
    assert "ultralytics" in " ".join(project["optional-dependencies"]["yolo"])
    assert project["license"] == "Apache-2.0"  # SPDX string: no setuptools deprecation banner
    assert {"test", "yolo", "docs", "load", "bench"} <= set(project["optional-dependencies"])


def test_yolo_extra_only_when_asked_for() -> None:
    asked = pip_lines(dry_run("serve", MODELS="yolov8n", EXTRAS="yolo"))
    assert any("'.[yolo]'" in line for line in asked), asked


def test_test_installs_every_extra_after_the_serving_install() -> None:
    lines = pip_lines(dry_run("test"))
    extras = [line for line in lines if "'.[" in line]
    assert len(extras) == 1 and "'.[test,yolo,docs,load,bench]'" in extras[0], lines
    assert lines.index(extras[0]) > next(i for i, line in enumerate(lines) if "-e . " in line)


def test_ci_calls_make_test() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "make test" in script

