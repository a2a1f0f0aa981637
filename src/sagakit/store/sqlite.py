"""The embedded SQLite store: one writer thread with group commit, one reader thread.

All writes go through a single writer thread. It takes every write queued while the previous
transaction was committing and commits them together, then wakes each waiting saga: one fsync
serves many sagas (group commit). Writes queued with ``append_soon`` do not wake anyone; the
writer holds them briefly so they ride along with the next durable write instead of costing an
fsync of their own.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, Final, TypeVar

from sagakit.errors import (
    ConfigurationError,
    DatabaseOwned,
    SagaNotFound,
    SchemaTooNew,
    StoreError,
)
from sagakit.journal import Entry, Kind, SagaState, row_changes
from sagakit.store.base import Decide, SagaRecord

log = logging.getLogger("sagakit.store")
T = TypeVar("T")

_SAGA_COLUMNS: Final = (
    "id, saga_type, version, state, idempotency_key, input, output, error, current_step, "
    "deadline, created_at, updated_at"
)
_JOURNAL_COLUMNS: Final = "saga_id, idx, kind, at, seq, step, attempt, payload, error, data"
_INSERT_ENTRY: Final = (
    f"INSERT INTO sagakit_journal ({_JOURNAL_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
)
_ROW_COLUMNS: Final = frozenset({"state", "current_step", "output", "error", "updated_at"})
_SYNC_MODES: Final = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}


def migrations() -> list[tuple[int, str]]:
    """The numbered SQL migrations shipped with sagakit, in order."""
    folder = resources.files("sagakit.store.migrations.sqlite")
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            found.append((int(item.name.split("_", 1)[0]), item.read_text()))
    return sorted(found)


def _entry_row(saga_id: str, e: Entry) -> tuple[Any, ...]:
    return (
        saga_id,
        e.index,
        e.kind.value,
        e.at,
        e.seq,
        e.step,
        e.attempt,
        e.payload,
        None if e.error is None else json.dumps(e.error),
        None if e.data is None else json.dumps(e.data),
    )


def _record(row: tuple[Any, ...]) -> SagaRecord:
    return SagaRecord(
        id=row[0],
        saga_type=row[1],
        version=row[2],
        state=SagaState(row[3]),
        idempotency_key=row[4],
        input=row[5],
        output=row[6],
        error=None if row[7] is None else json.loads(row[7]),
        current_step=row[8],
        deadline=row[9],
        created_at=row[10],
        updated_at=row[11],
    )


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(
        saga_id=row[0],
        index=row[1],
        kind=Kind(row[2]),
        at=row[3],
        seq=row[4],
        step=row[5],
        attempt=row[6],
        payload=row[7],
        error=None if row[8] is None else json.loads(row[8]),
        data=None if row[9] is None else json.loads(row[9]),
    )


def _append(conn: sqlite3.Connection, saga_id: str, entries: Sequence[Entry]) -> None:
    conn.executemany(_INSERT_ENTRY, [_entry_row(saga_id, e) for e in entries])
    changes = row_changes(entries)
    if "error" in changes:
        changes["error"] = json.dumps(changes["error"])
    cols = [c for c in changes if c in _ROW_COLUMNS]
    sets = ", ".join(f"{c} = ?" for c in cols)
    conn.execute(
        f"UPDATE sagakit_sagas SET {sets} WHERE id = ?", [*(changes[c] for c in cols), saga_id]
    )


def _create(conn: sqlite3.Connection, r: SagaRecord, first: Entry) -> tuple[SagaRecord, bool]:
    cur = conn.execute(
        f"INSERT INTO sagakit_sagas ({_SAGA_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT (idempotency_key) DO NOTHING",
        (
            r.id, r.saga_type, r.version, r.state.value, r.idempotency_key, r.input, r.output,
            None, r.current_step, r.deadline, r.created_at, r.updated_at,
        ),
    )  # fmt: skip
    if cur.rowcount == 0:
        row = conn.execute(
            f"SELECT {_SAGA_COLUMNS} FROM sagakit_sagas WHERE idempotency_key = ?",
            (r.idempotency_key,),
        ).fetchone()
        return _record(row), False
    conn.execute(_INSERT_ENTRY, _entry_row(r.id, first))
    return r, True


class _Op:
    __slots__ = ("apply", "error", "future", "result")

    def __init__(
        self, apply: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any] | None
    ) -> None:
        self.apply = apply
        self.future = future
        self.result: Any = None
        self.error: BaseException | None = None


_STOP: Final = object()


def _settle(ops: list[_Op], drained: threading.Event) -> None:
    loop = asyncio.get_running_loop()
    # Set once the sagas woken here have run up to their next write, so that the writer's
    # next transaction carries all of those writes instead of the first one alone.
    loop.call_soon(drained.set)
    for op in ops:
        fut = op.future
        if fut is None or fut.done():
            if op.error is not None:
                log.error("a queued journal write failed: %s", op.error)
            continue
        if op.error is None:
            fut.set_result(op.result)
        else:
            fut.set_exception(op.error)


class SqliteStore:
    """SQLite store. ``durability`` is ``"full"`` (fsync on every commit, the default),
    ``"normal"`` (WAL without fsync per commit: survives a process crash, not power loss)."""

    def __init__(self, path: str, *, durability: str = "full", lazy_delay: float = 0.005) -> None:
        if durability not in _SYNC_MODES:
            raise ConfigurationError(
                f"durability must be one of {sorted(_SYNC_MODES)}, got {durability!r}"
            )
        self.path = path
        self.location = f"sqlite:///{path}"
        self._sync = _SYNC_MODES[durability]
        self._lazy_delay = lazy_delay
        self._drain_wait = 0.002
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sagakit-sqlite-reader")
        self._reader_conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._configure(conn)
        return conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute(f"PRAGMA synchronous = {self._sync}")

    async def open(self) -> None:
        """Create or migrate the database and start the writer thread."""
        if self._writer is not None:
            return
        self._loop = asyncio.get_running_loop()
        await self._read(self._migrate)
        self._writer = threading.Thread(target=self._write_loop, name="sagakit-sqlite-writer")
        self._writer.daemon = True
        self._writer.start()

    def _schema_version(self, conn: sqlite3.Connection) -> int:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sagakit_schema'"
        ).fetchone()
        if exists is None:
            return 0
        row = conn.execute("SELECT max(version) FROM sagakit_schema").fetchone()
        return int(row[0] or 0)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        available = migrations()
        latest = available[-1][0]
        # Refuse a newer schema before anything (even the journal mode) touches the file.
        if self._schema_version(conn) > latest:
            raise SchemaTooNew(self.location, self._schema_version(conn), latest)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS sagakit_schema (version INTEGER NOT NULL)")
            current = self._schema_version(conn)
            if current > latest:
                raise SchemaTooNew(self.location, current, latest)
            for number, sql in available:
                if number > current:
                    for statement in sql.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute("INSERT INTO sagakit_schema (version) VALUES (?)", (number,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def schema_version(self) -> int:
        """The schema version of the open database."""
        return await self._read(self._schema_version)

    async def close(self) -> None:
        """Commit everything queued, then stop the threads."""
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        await self._read(self._close_reader)
        self._reader.shutdown(wait=True)
        self.release_ownership()

    def _close_reader(self, conn: sqlite3.Connection) -> None:
        conn.close()
        self._reader_conn = None

    def acquire_ownership(self) -> None:
        """Take the file lock that makes this process the one executing the sagas."""
        fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseOwned(self.path) from None
        self._lock_fd = fd

    def release_ownership(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writing -----------------------------------------------------------------------------

    def _submit(self, apply: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._writer is None or self._loop is None:
            raise StoreError("the store is not open; use `async with App(...)` or await app.open()")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Op(apply, fut))
        return fut

    async def create(self, record: SagaRecord, first: Entry) -> tuple[SagaRecord, bool]:
        return await self._submit(lambda conn: _create(conn, record, first))

    async def append(self, saga_id: str, entries: Sequence[Entry]) -> None:
        await self._submit(lambda conn: _append(conn, saga_id, entries))

    def append_soon(self, saga_id: str, entries: Sequence[Entry]) -> None:
        self._queue.put(_Op(lambda conn: _append(conn, saga_id, entries), None))

    async def append_checked(self, saga_id: str, decide: Decide) -> SagaRecord:
        def apply(conn: sqlite3.Connection) -> SagaRecord:
            row = conn.execute(
                f"SELECT {_SAGA_COLUMNS} FROM sagakit_sagas WHERE id = ?", (saga_id,)
            ).fetchone()
            if row is None:
                raise SagaNotFound(saga_id)
            journal = [
                _entry(r)
                for r in conn.execute(
                    f"SELECT {_JOURNAL_COLUMNS} FROM sagakit_journal WHERE saga_id = ? "
                    "ORDER BY idx",
                    (saga_id,),
                )
            ]
            entries = decide(_record(row), journal)
            _append(conn, saga_id, entries)
            updated = conn.execute(
                f"SELECT {_SAGA_COLUMNS} FROM sagakit_sagas WHERE id = ?", (saga_id,)
            ).fetchone()
            return _record(updated)

        return await self._submit(apply)

    def _write_loop(self) -> None:
        conn = self._connect()
        q = self._queue
        stopping = False
        drained = threading.Event()
        try:
            while not stopping:
                first = q.get()
                if first is _STOP:
                    break
                batch: list[_Op] = [first]
                stopping = self._gather(q, batch)
                self._commit(conn, batch)
                assert self._loop is not None
                drained.clear()
                try:
                    self._loop.call_soon_threadsafe(_settle, batch, drained)
                except RuntimeError:  # the loop closed under us
                    continue
                drained.wait(self._drain_wait)
        finally:
            conn.close()

    def _gather(self, q: queue.SimpleQueue[Any], batch: list[_Op]) -> bool:
        """Add every queued op to ``batch``; wait a little while all are lazy. True on STOP."""
        waited = False
        while True:
            try:
                op = q.get_nowait()
            except queue.Empty:
                if waited or any(o.future is not None for o in batch):
                    return False
                waited = True
                try:
                    op = q.get(timeout=self._lazy_delay)
                except queue.Empty:
                    return False
            if op is _STOP:
                return True
            batch.append(op)

    def _commit(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for op in batch:
                    op.result = op.apply(conn)
            except Exception:
                conn.execute("ROLLBACK")
                self._commit_isolated(conn, batch)
                return
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            err = StoreError(f"writing to {self.location} failed: {exc}")
            err.__cause__ = exc
            for op in batch:
                op.error = err

    def _commit_isolated(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        """Commit the batch with each op in its own savepoint, so one bad op fails alone."""
        conn.execute("BEGIN IMMEDIATE")
        for op in batch:
            conn.execute("SAVEPOINT op")
            try:
                op.result = op.apply(conn)
                op.error = None
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                op.error = exc if not isinstance(exc, sqlite3.Error) else StoreError(str(exc))
            conn.execute("RELEASE op")
        conn.execute("COMMIT")

    # -- reading -----------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, self._in_reader, fn)

    def _in_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if self._reader_conn is None:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                try:
                    self._configure(conn)
                except BaseException:
                    conn.close()
                    raise
                self._reader_conn = conn
            return fn(self._reader_conn)
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc) or "malformed" in str(exc):
                raise StoreError(f"{self.path} is not a sagakit database ({exc})") from exc
            raise StoreError(f"reading {self.location} failed: {exc}") from exc

    async def get(self, saga_id: str) -> SagaRecord | None:
        def q(conn: sqlite3.Connection) -> SagaRecord | None:
            row = conn.execute(
                f"SELECT {_SAGA_COLUMNS} FROM sagakit_sagas WHERE id = ?", (saga_id,)
            ).fetchone()
            return None if row is None else _record(row)

        return await self._read(q)

    async def journal(self, saga_id: str) -> list[Entry]:
        def q(conn: sqlite3.Connection) -> list[Entry]:
            rows = conn.execute(
                f"SELECT {_JOURNAL_COLUMNS} FROM sagakit_journal WHERE saga_id = ? ORDER BY idx",
                (saga_id,),
            ).fetchall()
            return [_entry(r) for r in rows]

        return await self._read(q)

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
            where.append("state = ?")
            args.append(SagaState(state).value)
        if saga_type is not None:
            where.append("saga_type = ?")
            args.append(saga_type)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = (
            f"SELECT {_SAGA_COLUMNS} FROM sagakit_sagas {clause} "
            "ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
        )

        def q(conn: sqlite3.Connection) -> list[SagaRecord]:
            return [_record(r) for r in conn.execute(sql, [*args, limit, offset]).fetchall()]

        return await self._read(q)

    async def active(
        self, *, limit: int = 500, after: tuple[float, str] | None = None
    ) -> list[SagaRecord]:
        created, last_id = after if after is not None else (-1.0, "")

        def q(conn: sqlite3.Connection) -> list[SagaRecord]:
            rows = conn.execute(
                f"SELECT {_SAGA_COLUMNS} FROM sagakit_sagas "
                "WHERE state IN ('started', 'running', 'compensating') "
                "AND (created_at, id) > (?, ?) ORDER BY created_at, id LIMIT ?",
                (created, last_id, limit),
            ).fetchall()
            return [_record(r) for r in rows]

        return await self._read(q)

    async def counts(self) -> dict[str, int]:
        def q(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT state, count(*) FROM sagakit_sagas GROUP BY state")
            return dict(rows.fetchall())

        return await self._read(q)
