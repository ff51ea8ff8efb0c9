"""Shared fixtures."""

from __future__ import annotations

import pytest
from oracle import oracle_module


@pytest.fixture
def oracle(monkeypatch):
    """pytorch-grad-cam 1.5.7, the test-only oracle, with its eigen projections' sign aligned."""
    return oracle_module(monkeypatch)
