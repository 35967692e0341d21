"""Fixtures shared by the harness tests (the ``tok`` and ``stats_cache`` fixtures are in tests/conftest.py)."""
from __future__ import annotations

import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """SPHERE_FAST_CACHE_DIR pointed at a fresh folder for one test; the folder (not created)."""
    monkeypatch.setenv("SPHERE_FAST_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"
