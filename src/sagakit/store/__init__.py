"""Stores: where sagas and their journals live. Chosen by URL."""

from __future__ import annotations

from urllib.parse import urlparse

from sagakit.clock import SYSTEM_CLOCK, Clock
from sagakit.errors import ConfigurationError
from sagakit.store.base import SagaRecord, Store
from sagakit.store.sqlite import SqliteStore

__all__ = ["SagaRecord", "SqliteStore", "Store", "open_store", "sqlite_store"]

DEFAULT_URL = "sqlite:///sagakit.db"


def open_store(
    url: str | None,
    *,
    durability: str = "full",
    pool_size: int = 10,
    lease: float = 10.0,
    clock: Clock = SYSTEM_CLOCK,
) -> Store:
    """The store a database URL names: ``sqlite:///relative.db``, ``sqlite:////abs/path.db``,
    a plain file path, or ``postgresql://user@host:port/db[?schema=name]``."""
    url = url or DEFAULT_URL
    if clock is not SYSTEM_CLOCK and urlparse(url).scheme in ("postgresql", "postgres"):
        raise ConfigurationError(
            "a virtual clock works on SQLite only: PostgreSQL judges timers by its own clock"
        )
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigurationError(f"{url!r} names no file; use sqlite:///path/to/file.db")
        return SqliteStore(path, durability=durability, clock=clock)
    if parsed.scheme == "":
        return SqliteStore(url, durability=durability, clock=clock)
    if parsed.scheme in ("postgresql", "postgres"):
        from sagakit.store.postgres import PostgresStore

        return PostgresStore(url, pool_size=pool_size, lease=lease)
    raise ConfigurationError(
        f"unsupported database URL {url!r}: use sqlite:///path.db or postgresql://host/db"
    )


def sqlite_store(store: Store, purpose: str) -> SqliteStore:
    """``store`` as a SqliteStore, or a ConfigurationError saying ``purpose`` needs SQLite."""
    if not isinstance(store, SqliteStore):
        raise ConfigurationError(f"{purpose} works on a SQLite database, not {store.location}")
    return store
