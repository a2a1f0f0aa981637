"""The inbox: a service handles each command once, however often the broker delivers it.

Brokers deliver at least once, and the orchestrator re-sends a command after a crash with the
same message id. The inbox is a table keyed by message id that remembers, for every handled
command, the reply that was sent for it::

    sagakit_inbox (message_id text PRIMARY KEY, handled_at, reply text)

A command is handled in one database transaction that first inserts its inbox row (so a
concurrent duplicate waits on, or collides with, that row instead of running the effect again),
then runs the handler inside a savepoint, then stores the reply in the row. A duplicate that
arrives later finds the row and gets the stored reply re-sent instead.

The inbox lives in the database ``url`` names: ``sqlite:///path/inbox.db`` or
``postgresql://user@host/db[?schema=name]``. It creates its one table if it is missing and
touches nothing else, so it can share **sagakit's own database** (the App's URL) or **the
service's database**. Sharing the database the handler writes to is what makes handling exact:
the handler gets the transaction's connection as ``ctx.db`` (a :class:`sqlite3.Connection`
on SQLite, an ``asyncpg.Connection`` on PostgreSQL) and its writes commit together with the
inbox row, or not at all::

    service = Service("InventoryService", broker="amqp://127.0.0.1/",
                      inbox="postgresql://127.0.0.1/shop?schema=inventory")

    @service.handles("ReserveItems")
    async def reserve(ctx: HandlerContext, data: dict) -> dict:
        await ctx.db.execute(
            "INSERT INTO stock_reservations (order_id, sku, qty) VALUES ($1, $2, $3)",
            data["order_id"], data["sku"], data["qty"])
        return {"reserved": data["qty"]}

A handler that raises has still been *handled*: its writes are rolled back to the savepoint,
and the inbox row commits with the failed reply, so a duplicate gets the same failure. Handlers
must not commit or roll back ``ctx.db`` themselves.

On SQLite one transaction is open at a time (SQLite has one writer, and the transaction holds
the write lock while the handler runs): handlers that share the inbox's file run one after the
other, and a long handler holds up every other writer of the file, sagakit's own included.
Use PostgreSQL for handlers that run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sagakit import inbox_sql as sql
from sagakit.errors import ConfigurationError, StoreError, StoreUnavailable

if TYPE_CHECKING:
    import asyncpg

T = TypeVar("T")


class InboxTx(Protocol):
    """One open inbox transaction: what the service runs a command's handling in."""

    @property
    def db(self) -> Any:
        """The transaction's connection, for the handler's own SQL."""
        ...

    async def claim(self, message_id: str) -> bool:
        """Insert the message's row; False if it is already there (a duplicate)."""
        ...

    async def record(self, message_id: str, reply_json: str) -> None:
        """Store the reply sent for the claimed message (``""`` for none)."""
        ...

    def savepoint(self) -> contextlib.AbstractAsyncContextManager[None]:
        """A block whose writes are rolled back, and only those, if it raises."""
        ...


class _Backend(Protocol):
    location: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def seen(self, message_id: str) -> str | None: ...

    def transaction(self) -> contextlib.AbstractAsyncContextManager[InboxTx]: ...


class Inbox:
    """The inbox table in the database ``url`` names (see the module docstring).

    Args:
        url: ``sqlite:///path.db`` (relative to the working directory; ``sqlite:////abs``)
            or ``postgresql://user@host:port/db[?schema=name]``.
        pool_size: PostgreSQL connections; each open transaction holds one.
    """

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        scheme = urlsplit(url).scheme
        self._backend: _Backend
        if scheme == "sqlite":
            path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
            if not path:
                raise ConfigurationError(f"{url!r} names no file; use sqlite:///path/inbox.db")
            self._backend = _SqliteInbox(path)
        elif scheme in ("postgresql", "postgres"):
            self._backend = _PgInbox(url, pool_size)
        else:
            raise ConfigurationError(
                f"unsupported inbox URL {url!r}: use sqlite:///path.db or postgresql://host/db"
            )
        self.location = self._backend.location
        self._opening = asyncio.Lock()

    async def open(self) -> None:
        """Connect, and create the inbox table if it is missing; opening it again (another
        user of the same inbox) does nothing more."""
        async with self._opening:
            await self._backend.open()

    async def close(self) -> None:
        await self._backend.close()

    async def __aenter__(self) -> Inbox:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def seen(self, message_id: str) -> str | None:
        """The reply stored for ``message_id`` (``""``: handled, no reply), None if unseen.

        Raises:
            StoreError: the database failed (StoreUnavailable: cannot be reached now).
        """
        return await self._backend.seen(message_id)

    def transaction(self) -> contextlib.AbstractAsyncContextManager[InboxTx]:
        """A transaction that commits when the block ends, and rolls back if it raises."""
        return self._backend.transaction()


# -- SQLite ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _sqlite_errors(location: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        # Locked past the busy timeout, or the file cannot be opened: both pass.
        raise StoreUnavailable(location, f"{type(exc).__name__}: {exc}") from exc
    except sqlite3.Error as exc:
        raise StoreError(f"{location}: {type(exc).__name__}: {exc}") from exc


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


class _SqliteInbox:
    """One connection, used from one thread; one transaction at a time (SQLite's writer)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.location = f"sqlite:///{path}"
        self._thread: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        # Transactions queue here rather than in SQLite's busy handler, which would hold a
        # thread each and give up after its timeout.
        self._lock = asyncio.Lock()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            raise StoreError(f"the inbox {self.location} is not open")
        with _sqlite_errors(self.location):
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(sql.SQLITE_CREATE)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        if self._conn is not None:
            return
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sagakit-inbox")
        try:
            self._conn = await self._run(self._connect)
        except BaseException:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await self._run(self._conn.close)
                self._conn = None
            if self._thread is not None:
                self._thread.shutdown(wait=True)
                self._thread = None

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the inbox {self.location} is not open")
        return self._conn

    async def seen(self, message_id: str) -> str | None:
        # Behind the lock: the connection may hold a transaction whose claim is not committed.
        async with self._lock:
            conn = self._require()
            row = await self._run(lambda: conn.execute(sql.SQLITE_SEEN, (message_id,)).fetchone())
        return None if row is None else str(row[0] or "")

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[InboxTx]:
        async with self._lock:
            conn = self._require()
            await self._run(conn.execute, "BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(conn, self._run)
                await self._run(conn.execute, "COMMIT")
            except BaseException:
                await self._run(_rollback, conn)
                raise


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection, run: Callable[..., Any]) -> None:
        self._conn = conn
        self._run = run

    @property
    def db(self) -> sqlite3.Connection:
        return self._conn

    async def claim(self, message_id: str) -> bool:
        def insert() -> int:
            return self._conn.execute(sql.SQLITE_CLAIM, (message_id, time.time())).rowcount

        return bool(await self._run(insert) == 1)

    async def record(self, message_id: str, reply_json: str) -> None:
        await self._run(
            self._conn.execute, sql.SQLITE_RECORD, (reply_json, time.time(), message_id)
        )

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        await self._run(self._conn.execute, sql.SQLITE_SAVEPOINT)
        try:
            yield
            await self._run(self._conn.execute, sql.SQLITE_RELEASE_SAVEPOINT)
        except Exception:  # a cancellation rolls the whole transaction back instead
            await self._run(self._undo)
            raise

    def _undo(self) -> None:
        self._conn.execute(sql.SQLITE_ROLLBACK_SAVEPOINT)
        self._conn.execute(sql.SQLITE_RELEASE_SAVEPOINT)


# -- PostgreSQL --------------------------------------------------------------------------------


def _split_pg_url(url: str) -> tuple[str, str]:
    """The DSN without ``schema=``, and the schema (as sagakit's PostgreSQL store reads it)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", "public")
    if not schema.replace("_", "").isalnum():
        raise ConfigurationError(f"schema {schema!r} must be letters, digits and underscores")
    return urlunsplit(parts._replace(query=urlencode(query))), schema


@contextlib.asynccontextmanager
async def _pg_errors(location: str) -> AsyncIterator[None]:
    from sagakit.store.postgres_errors import translate

    async with translate(location):
        yield


class _PgInbox:
    def __init__(self, url: str, pool_size: int) -> None:
        try:
            import asyncpg  # noqa: F401 - fail early with a clear message
        except ImportError as exc:
            raise ConfigurationError(
                "a PostgreSQL inbox needs the asyncpg driver: pip install 'sagakit[postgres]'"
            ) from exc
        self._dsn, self.schema = _split_pg_url(url)
        self.location = urlunsplit(urlsplit(url)._replace(netloc=urlsplit(url).hostname or ""))
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        if self._pool is not None:
            return
        import asyncpg

        async with _pg_errors(self.location):
            conn = await asyncpg.connect(self._dsn)
            try:
                await self._create_table(conn)
            finally:
                await conn.close()
            # The handler's unqualified table names resolve in the inbox's schema too.
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                server_settings={"search_path": self.schema, "application_name": "sagakit"},
            )

    async def _create_table(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute(sql.PG_SETUP_LOCK, f"sagakit_wake_{self.schema}")
            if not await conn.fetchval(sql.PG_SCHEMA_EXISTS, self.schema):
                await conn.execute(sql.PG_CREATE_SCHEMA.format(schema=self.schema))
            await conn.execute(sql.PG_SET_SEARCH_PATH.format(schema=self.schema))
            if not await conn.fetchval(sql.PG_TABLE_EXISTS):
                await conn.execute(sql.PG_CREATE)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _require(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError(f"the inbox {self.location} is not open")
        return self._pool

    async def seen(self, message_id: str) -> str | None:
        pool = self._require()
        async with _pg_errors(self.location), pool.acquire() as conn:
            row = await conn.fetchrow(sql.PG_SEEN, message_id)
        return None if row is None else str(row[0] or "")

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[InboxTx]:
        pool = self._require()
        async with _pg_errors(self.location), pool.acquire() as conn, conn.transaction():
            yield _PgTx(conn, self.location)


class _PgTx:
    def __init__(self, conn: asyncpg.Connection, location: str) -> None:
        self._conn = conn
        self._location = location

    @property
    def db(self) -> asyncpg.Connection:
        return self._conn

    async def claim(self, message_id: str) -> bool:
        async with _pg_errors(self._location):
            return bool(await self._conn.fetchval(sql.PG_CLAIM, message_id))

    async def record(self, message_id: str, reply_json: str) -> None:
        async with _pg_errors(self._location):
            await self._conn.execute(sql.PG_RECORD, message_id, reply_json)

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        async with _pg_errors(self._location):
            await self._conn.execute(sql.PG_SAVEPOINT)
        try:
            yield
            # Fails if the handler left the transaction aborted (it caught its own SQL error):
            # then the handler's writes are undone like those of a handler that raised.
            await self._conn.execute(sql.PG_RELEASE_SAVEPOINT)
        except Exception:  # a cancellation rolls the whole transaction back instead
            async with _pg_errors(self._location):
                await self._conn.execute(sql.PG_ROLLBACK_SAVEPOINT)
                await self._conn.execute(sql.PG_RELEASE_SAVEPOINT)
            raise
