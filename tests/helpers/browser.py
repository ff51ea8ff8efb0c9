"""Headless Chromium for the tests that look at a page (the audit report, the docs site): Debian's browser,
driven by Playwright, with the launch arguments a container without a display or a sandbox needs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

__all__ = ["CHROMIUM", "require_chromium", "headless_chromium"]

CHROMIUM = Path("/usr/bin/chromium")  # `make test` installs it (make chromium: tests/ensure_debian.sh)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-extensions", "--disable-sync", "--no-first-run", "--disable-default-apps"]  # fmt: skip


def require_chromium() -> None:
    """Skips the test when Chromium or Playwright is missing (call it before any costly set-up)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: `make test` installs Debian's chromium (tests/ensure_debian.sh)")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")


@contextmanager
def headless_chromium() -> Iterator[Any]:
    """A launched headless Chromium (a Playwright ``Browser``), closed on exit."""
    require_chromium()
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser
        finally:
            browser.close()
