"""Fixtures of the federation tests: `site_caches` (tests/sim_fixtures.make_site_caches)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim_fixtures import make_site_caches


@pytest.fixture(scope="session")
def site_caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three sites of six tiny cached patients (shared by the tests of a session; read-only)."""
    return make_site_caches(tmp_path_factory.mktemp("caches"))
