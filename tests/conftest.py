"""Shared fixtures: an App on a fresh SQLite file per test; PostgreSQL schemas per test."""

from __future__ import annotations

import os
import socket
import uuid
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


# -- PostgreSQL --------------------------------------------------------------------------------

PG_BASE = os.environ.get("SAGAKIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_reachable() -> str | None:
    """None if PostgreSQL answers at PG_BASE, else why not."""
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return None
    except OSError as exc:
        return f"PostgreSQL is not reachable at 127.0.0.1:5432 ({exc})"


def require_pg() -> None:
    """Skip (locally) or fail (in CI, CI=true) when PostgreSQL is not running."""
    reason = _pg_reachable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must start it (see .ci/run)")
    pytest.skip(reason)


async def drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_BASE)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def pg_base() -> str:
    """The PostgreSQL URL without a schema (for code that makes scratch schemas itself)."""
    require_pg()
    return PG_BASE


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A PostgreSQL URL with a schema of its own, dropped after the test."""
    require_pg()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield f"{PG_BASE}?schema={schema}"
    await drop_schema(schema)


@pytest.fixture(params=["sqlite", "postgres"])
async def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The same test on a SQLite file and on a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sagas.db'}"
        return
    require_pg()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield f"{PG_BASE}?schema={schema}"
    await drop_schema(schema)
