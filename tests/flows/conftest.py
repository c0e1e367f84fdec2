from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_api(prefect_harness: str) -> str:
    """Every flow test talks to the session's one temporary Prefect API (tests/conftest.py)."""
    return prefect_harness
