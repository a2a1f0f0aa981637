"""The PostgreSQL store: many worker processes on many machines share one database.

Workers own sagas through leases: each worker has a row in ``sagakit_workers`` that its
heartbeat renews, and every saga it runs names it as ``owner``. A worker claims sagas with no
live owner (``FOR UPDATE SKIP LOCKED``); every journal write checks, in its own statement, that
the writer still owns the saga, so a worker that was paused past its lease cannot write over
the one that took over. New sagas, retries and released sagas wake workers through
``LISTEN/NOTIFY``; polling is the fallback.

URL: ``postgresql://user@host:port/database``; add ``?schema=name`` to keep sagakit's tables
in their own schema (created if missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sagakit.errors import ConfigurationError, SagaNotFound, SchemaTooNew, StoreError
from sagakit.journal import SUSPECT_AFTER, Entry, SagaState
from sagakit.store import postgres_outbox as outbox
from sagakit.store import postgres_sql as sql
from sagakit.store import rows
from sagakit.store.base import (
    Claimed,
    Decide,
    OutboxMessage,
    SagaRecord,
    Signal,
    TypeCap,
    new_worker_id,
)
from sagakit.store.postgres_errors import translate
from sagakit.store.postgres_waits import PgWaits, read_clock
from sagakit.store.postgres_writer import Op, PgWriter, append_args
from sagakit.store.sqlite import migrations

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("sagakit.store")
T = TypeVar("T")

# Seconds a worker's registered connection may be gone before the worker counts as dead.
DEAD_AFTER = 0.5


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool connections keep their session between uses: sagakit sets no session state, so
    asyncpg's default reset would only cost a round trip per query."""


def _split_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", "public")
    if not schema.replace("_", "").isalnum():
        raise ConfigurationError(f"schema {schema!r} must be letters, digits and underscores")
    return urlunsplit(parts._replace(query=urlencode(query))), schema


class PostgresStore:
    """PostgreSQL store over an asyncpg pool. ``lease`` is the seconds a worker keeps its
    sagas without a heartbeat; it beats every third of that."""

    def __init__(self, url: str, *, pool_size: int = 10, lease: float = 10.0) -> None:
        try:
            import asyncpg  # noqa: F401 - fail early with a clear message
        except ImportError as exc:
            raise ConfigurationError(
                "PostgreSQL needs the asyncpg driver: pip install 'sagakit[postgres]'"
            ) from exc
        self._dsn, self.schema = _split_url(url)
        self.location = urlunsplit(urlsplit(url)._replace(netloc=urlsplit(url).hostname or ""))
        self.worker_id = new_worker_id()
        self.lease = lease
        self._pool_size = pool_size
        self._channel = f"sagakit_wake_{self.schema}"
        self._pool: asyncpg.Pool | None = None
        self._owner: str | None = None
        self._writer = PgWriter(self._write, lambda: self._owner)
        self._waits = PgWaits(
            self.location, self._channel, self._require_pool, lambda: self._owner, self._writer
        )
        self._writer_conn: asyncpg.Connection | None = None
        self._beat_task: asyncio.Task[None] | None = None
        self._wake: Callable[[], None] | None = None
        self._last_beat = -float("inf")

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        import asyncpg

        # Generic plans: sagakit's statements take arrays whose sizes vary from batch to batch,
        # and re-planning them for every batch costs more than running them.
        settings = {
            "search_path": self.schema,
            "application_name": "sagakit",
            "plan_cache_mode": "force_generic_plan",
        }
        async with translate(self.location):
            await self._migrate(await asyncpg.connect(self._dsn))
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                server_settings=settings,
                reset=_keep_session,
            )
            async with self._pool.acquire() as conn:
                self._waits.clock = await read_clock(conn, tries=3)
        self._writer.start()

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        available = migrations("postgres")
        latest = available[-1][0]
        try:
            async with conn.transaction():
                # Concurrent first starts of many workers migrate once, one after the other.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._channel)
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                await conn.execute(f'SET LOCAL search_path TO "{self.schema}"')
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS sagakit_schema (version integer NOT NULL)"
                )
                current = await conn.fetchval(
                    "SELECT coalesce(max(version), 0) FROM sagakit_schema"
                )
                if current > latest:
                    raise SchemaTooNew(self.location, current, latest)
                for number, text in available:
                    if number > current:
                        await conn.execute(text)
                        await conn.execute("INSERT INTO sagakit_schema VALUES ($1)", number)
        finally:
            await conn.close()

    async def schema_version(self) -> int:
        return int(await self._fetchval("SELECT max(version) FROM sagakit_schema"))

    async def close(self) -> None:
        if self._beat_task is not None:  # a worker closed without stop_worker: stop beating
            self._beat_task.cancel()
            await asyncio.gather(self._beat_task, return_exceptions=True)
            self._beat_task = None
        await self._writer.stop()
        await self._drop_writer_conn()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        self._waits.clock = None

    async def start_worker(self, wake: Callable[[], None]) -> None:
        """Register this worker (before it claims anything: a saga whose owner is not
        registered counts as abandoned) and keep its lease and wake-ups alive."""
        self._owner, self._wake = self.worker_id, wake
        listening = await self._listen()
        self._beat_task = asyncio.create_task(
            self._heartbeat(listening), name="sagakit-pg-heartbeat"
        )

    def lease_held(self) -> bool:
        # A margin of a third of the lease covers the clock of the database and a slow beat.
        return time.monotonic() - self._last_beat < self.lease * 2 / 3

    async def _listen(self) -> tuple[asyncpg.Connection, asyncio.Event]:
        """A connection that LISTENs for wake-ups, with this worker's lease renewed on it, and
        an event set when the connection closes."""
        import asyncpg

        settings = {"search_path": self.schema, "application_name": "sagakit"}
        closed = asyncio.Event()
        async with translate(self.location):
            conn = await asyncpg.connect(self._dsn, server_settings=settings)
            try:
                conn.add_termination_listener(lambda _: closed.set())
                await conn.add_listener(self._channel, self._notified)
                await self._beat(conn)
            except BaseException:
                conn.terminate()
                raise
        return conn, closed

    async def _beat(self, conn: asyncpg.Connection) -> None:
        started = time.monotonic()
        await conn.execute(sql.HEARTBEAT, self.worker_id, self.lease)
        self._last_beat = started
        self._waits.clock = await read_clock(conn)  # follows the drift of the two clocks

    async def stop_worker(self) -> None:
        if self._beat_task is not None:
            self._beat_task.cancel()
            await asyncio.gather(self._beat_task, return_exceptions=True)
            self._beat_task = None
        await self._writer.stop()
        owner, self._owner = self._owner, None
        with contextlib.suppress(StoreError):  # unreachable: the lease expires on its own
            await self._execute(sql.RELEASE_ALL, [owner])
            await self._execute(sql.FORGET_WORKER, [owner])
            await self._execute(sql.NOTIFY, [self._channel])
        self._writer.start()

    async def _heartbeat(self, listening: tuple[asyncpg.Connection, asyncio.Event] | None) -> None:
        """Renew the lease every third of it on the listening connection. When that
        connection closes (the database restarted, an operator cut it), reconnect at once and
        then with backoff: until it is back, other workers may count this one as dead."""
        backoff = 0.05
        while True:
            try:
                if listening is None:
                    listening = await self._listen()
                    if self._wake is not None:
                        self._wake()  # catch up on anything sent while we were away
                    backoff = 0.05
                conn, closed = listening
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(closed.wait(), self.lease / 3)
                    raise ConnectionError("the listening connection closed")
                await self._beat(conn)
            except asyncio.CancelledError:
                if listening is not None:
                    listening[0].terminate()
                raise
            except Exception as exc:
                log.warning("lost the database connection of worker %s (%s); reconnecting in "
                            "%.2f s", self.worker_id, exc, backoff)  # fmt: skip
                if listening is not None:
                    listening[0].terminate()
                    listening = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.lease / 3)

    def _notified(self, *_: Any) -> None:
        if self._wake is not None:
            self._wake()

    # -- plumbing ----------------------------------------------------------------------------

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the store is not open; use `async with App(...)` or await app.open()")
        return self._pool

    async def _execute(self, statement: str, args: Sequence[Any]) -> list[Any]:
        async with translate(self.location):
            return list(await self._require_pool().fetch(statement, *args))

    async def _write(self, statement: str, args: Sequence[Any]) -> list[Any]:
        """Run a writer statement on the writer's own connection: it is never handed back to
        the pool between batches, which saves a round trip per batch."""
        async with translate(self.location):
            try:
                if self._writer_conn is None:
                    self._writer_conn = await self._require_pool().acquire()
                return list(await self._writer_conn.fetch(statement, *args))
            except BaseException:
                # Its state is unknown (a statement may still run on it): never reuse it.
                await self._drop_writer_conn(broken=True)
                raise

    async def _drop_writer_conn(self, *, broken: bool = False) -> None:
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None and self._pool is not None:
            with contextlib.suppress(Exception):
                if broken:
                    conn.terminate()
                await self._pool.release(conn, timeout=1.0)

    async def _fetchval(self, statement: str, *args: Any) -> Any:
        async with translate(self.location):
            return await self._require_pool().fetchval(statement, *args)

    # -- writing -----------------------------------------------------------------------------

    async def create(self, record: SagaRecord, first: Entry) -> tuple[SagaRecord, bool]:
        self._require_pool()
        fut: asyncio.Future[tuple[SagaRecord, bool]] = asyncio.get_running_loop().create_future()
        self._writer.submit(Op(record.id, (first,), fut, record))
        stored, created = await fut
        if created and record.owner is None:
            await self._execute(sql.NOTIFY, [self._channel])  # a worker should claim it
        return stored, created

    async def append(self, saga_id: str, entries: Sequence[Entry]) -> None:
        self._require_pool()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writer.submit(Op(saga_id, entries, fut))
        await fut

    def append_soon(self, saga_id: str, entries: Sequence[Entry]) -> None:
        self._require_pool()
        self._writer.submit(Op(saga_id, entries, None))

    async def append_checked(self, saga_id: str, decide: Decide) -> SagaRecord:
        pool = self._require_pool()
        async with translate(self.location), pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(sql.GET_FOR_UPDATE, saga_id)
            if row is None:
                raise SagaNotFound(saga_id)
            journal = [rows.entry(r) for r in await conn.fetch(sql.JOURNALS, [saga_id])]
            entries = decide(rows.record(row), journal)
            op = Op(saga_id, entries, None)
            await conn.fetch(sql.APPEND, *append_args([op], None))
            await conn.execute(sql.UNOWN, saga_id)
            await conn.execute(sql.NOTIFY, self._channel)
            updated = await conn.fetchrow(sql.GET, saga_id)
        return rows.record(updated)

    async def claim(
        self,
        limit: int,
        caps: Mapping[str, TypeCap] | None = None,
        *,
        suspects: bool = False,
        suspect_after: int = SUSPECT_AFTER,
    ) -> list[Claimed]:
        owner = self._owner
        if owner is None:
            raise StoreError("claim() needs start_worker() first")
        caps = caps or {}
        ceiling = 2**31 - 1
        bounds = [suspect_after, ceiling] if suspects else [0, suspect_after]
        if caps:
            found = await self._claim_capped(owner, limit, caps, bounds)
        else:
            taken = await self._execute(sql.CLAIM, [owner, limit, None, [], *bounds, DEAD_AFTER])
            found = [rows.record(r) for r in taken]
        return await self._with_journals(found)

    async def adopt(self, running: Collection[str], limit: int) -> list[Claimed]:
        if self._owner is None:
            return []
        found = await self._execute(sql.ADOPT, [self._owner, list(running), limit])
        return await self._with_journals([rows.record(r) for r in found])

    async def _with_journals(self, found: list[SagaRecord]) -> list[Claimed]:
        if not found:
            return []
        found.sort(key=lambda r: (r.created_at, r.id))
        journals: dict[str, list[Entry]] = {r.id: [] for r in found}
        for row in await self._execute(sql.JOURNALS, [list(journals)]):
            journals[row[0]].append(rows.entry(row))
        return [Claimed(record=r, journal=journals[r.id]) for r in found]

    async def _claim_capped(
        self, owner: str, limit: int, caps: Mapping[str, TypeCap], bounds: list[int]
    ) -> list[SagaRecord]:
        """Claim capped types one by one under a per-type advisory lock, so that workers
        claiming at the same moment cannot together exceed a type's cluster-wide cap."""
        found: list[SagaRecord] = []
        pool = self._require_pool()
        async with translate(self.location), pool.acquire() as conn, conn.transaction():
            for saga_type, cap in sorted(caps.items()):
                room = min(cap.worker, limit - len(found))
                if cap.cluster is not None:
                    await conn.execute(sql.TYPE_LOCK, f"sagakit:{self.schema}:{saga_type}")
                    flying = await conn.fetchval(sql.IN_FLIGHT, saga_type, DEAD_AFTER)
                    room = min(room, cap.cluster - flying)
                if room > 0:
                    taken = await conn.fetch(
                        sql.CLAIM, owner, room, [saga_type], [], *bounds, DEAD_AFTER
                    )
                    found += [rows.record(r) for r in taken]
            rest = limit - len(found)
            if rest > 0:
                taken = await conn.fetch(
                    sql.CLAIM, owner, rest, None, list(caps), *bounds, DEAD_AFTER
                )
                found += [rows.record(r) for r in taken]
        return found

    async def release(self, saga_ids: Sequence[str]) -> None:
        await self._execute(sql.RELEASE, [self._owner, list(saga_ids)])
        await self._execute(sql.NOTIFY, [self._channel])

    # -- reading -----------------------------------------------------------------------------

    async def get(self, saga_id: str) -> SagaRecord | None:
        found = await self._execute(sql.GET, [saga_id])
        return rows.record(found[0]) if found else None

    async def by_idempotency_key(self, key: str) -> SagaRecord | None:
        found = await self._execute(sql.BY_KEY, [key])
        return rows.record(found[0]) if found else None

    async def journal(self, saga_id: str) -> list[Entry]:
        return [rows.entry(r) for r in await self._execute(sql.JOURNALS, [[saga_id]])]

    async def list_sagas(
        self,
        *,
        state: SagaState | None = None,
        saga_type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[SagaRecord]:
        where, args = [], []
        if state is not None:
            args.append(SagaState(state).value)
            where.append(f"state = ${len(args)}")
        if saga_type is not None:
            args.append(saga_type)
            where.append(f"saga_type = ${len(args)}")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        n = len(args)
        statement = (
            f"SELECT {rows.SAGA_COLUMNS} FROM sagakit_sagas {clause} "
            f"ORDER BY created_at DESC, id LIMIT ${n + 1} OFFSET ${n + 2}"
        )
        return [rows.record(r) for r in await self._execute(statement, [*args, limit, offset])]

    async def counts(self, saga_type: str | None = None) -> dict[str, int]:
        if saga_type is None:
            return {r[0]: r[1] for r in await self._execute(sql.COUNTS, [])}
        return {r[0]: r[1] for r in await self._execute(sql.COUNTS_OF_TYPE, [saga_type])}

    # -- timers, signals, children (bodies in postgres_waits) ---------------------------------

    def clock_bounds(self) -> tuple[float, float]:
        return self._waits.clock_bounds()

    async def suspend(
        self, saga_id: str, wake_at: float, signals: Mapping[str, int], children: Sequence[str]
    ) -> None:
        await self._waits.suspend(saga_id, wake_at, signals, children)

    async def wake(self, saga_id: str) -> None:
        await self._waits.wake(saga_id)

    async def next_wake(self) -> float | None:
        return await self._waits.next_wake()

    async def send_signal(
        self, saga_id: str, signal_id: str, name: str, payload: str | None, at: float
    ) -> bool:
        return await self._waits.send_signal(saga_id, signal_id, name, payload, at)

    async def signals(self, saga_id: str, name: str | None = None) -> list[Signal]:
        return await self._waits.signals(saga_id, name)

    async def cancel_requests(self, after: int) -> list[Signal]:
        return await self._waits.cancel_requests(after)

    async def outbox_claim(self, limit: int, lease: float) -> list[OutboxMessage]:
        return await outbox.claim(self._require_pool(), self.location, limit, lease)

    async def outbox_done(self, ids: Sequence[int]) -> None:
        await outbox.done(self._require_pool(), self.location, ids)

    async def outbox_stats(self) -> tuple[int, float | None]:
        return await outbox.stats(self._require_pool(), self.location)
