"""Stores: where sagas and their journals live. Chosen by URL."""

from __future__ import annotations

from urllib.parse import urlparse

from sagakit.errors import ConfigurationError
from sagakit.store.base import SagaRecord, Store
from sagakit.store.sqlite import SqliteStore

__all__ = ["SagaRecord", "SqliteStore", "Store", "open_store"]

DEFAULT_URL = "sqlite:///sagakit.db"


def open_store(url: str | None, *, durability: str = "full") -> SqliteStore:
    """The store a database URL names: ``sqlite:///relative.db``, ``sqlite:////abs/path.db``
    or a plain file path."""
    url = url or DEFAULT_URL
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigurationError(f"{url!r} names no file; use sqlite:///path/to/file.db")
        return SqliteStore(path, durability=durability)
    if parsed.scheme == "":
        return SqliteStore(url, durability=durability)
    raise ConfigurationError(
        f"unsupported database URL {url!r}: use sqlite:///path.db "
        "(PostgreSQL support is planned: postgresql://...)"
    )
