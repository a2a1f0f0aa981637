"""asyncpg's errors translated into sagakit's, at the boundary, with the cause kept."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sagakit.errors import SagakitError, StoreError, StoreUnavailable


def _unavailable(exc: BaseException) -> bool:
    import asyncpg

    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.exceptions.InternalClientError  # a connection left mid-operation by a kill
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.OperatorInterventionError  # admin shutdown, terminated backend
        | asyncpg.exceptions.CannotConnectNowError,
    )


@contextlib.asynccontextmanager
async def translate(location: str) -> AsyncIterator[None]:
    """Raise :class:`StoreUnavailable` for a lost or refused connection and
    :class:`StoreError` for any other driver error; sagakit's own errors pass through."""
    import asyncpg

    try:
        yield
    except SagakitError:
        raise
    except Exception as exc:
        if _unavailable(exc):
            raise StoreUnavailable(location, f"{type(exc).__name__}: {exc}") from exc
        if isinstance(exc, asyncpg.PostgresError):
            raise StoreError(f"{location}: {type(exc).__name__}: {exc}") from exc
        raise
