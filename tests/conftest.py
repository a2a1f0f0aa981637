"""Shared fixtures: an App on a fresh SQLite file per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sagakit import App


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sagas.db'}"


@pytest.fixture
async def app(db_url: str) -> AsyncIterator[App]:
    """An App that executes sagas, on its own database; register definitions before use."""
    instance = App(db_url, poll_interval=0.05)
    yield instance
    await instance.close()
