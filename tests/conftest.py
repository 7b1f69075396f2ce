"""Shared pytest set-up: deterministic, quiet, and ordered so that `make test` (pytest-xdist, 2 workers, one test
file per worker at a time) starts the long end-to-end files first and fills the tail with the short ones."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding a ``slow`` test first, then those holding an ``integration`` test, then the rest (stable:
    collection order within each group). Every xdist worker sorts the same collection the same way; xdist hands the
    files out in this order only with ``--no-loadscope-reorder`` (``make test`` passes it)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    integration = {item.path for item in items if item.get_closest_marker("integration")}
    items.sort(key=lambda item: (item.path not in slow, item.path not in integration))
