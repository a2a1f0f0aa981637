"""The embedded SQLite store: a group-commit writer thread and a reader thread.

One process executes a file's sagas: it holds an exclusive lock on ``<file>.lock``, which the
operating system drops when the process dies, however it dies. Other processes may open the
file to start and read sagas.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, Final, Literal, TypeVar

from sagakit.clock import SYSTEM_CLOCK, Clock
from sagakit.errors import (
    ConfigurationError,
    DatabaseOwned,
    FencedOut,
    SagaNotFound,
    SchemaTooNew,
    StoreError,
)
from sagakit.journal import SUSPECT_AFTER, Entry, SagaState, made_progress, row_changes
from sagakit.store import rows
from sagakit.store import sqlite_waits as waits
from sagakit.store.base import (
    Claimed,
    Decide,
    OutboxMessage,
    SagaRecord,
    Signal,
    TypeCap,
    new_worker_id,
)
from sagakit.store.sqlite_writer import GroupCommitWriter

T = TypeVar("T")

_COLS: Final = rows.SAGA_COLUMNS
_INSERT_ENTRY: Final = (
    f"INSERT INTO sagakit_journal ({rows.JOURNAL_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
)
_ROW_COLUMNS: Final = frozenset(
    {"state", "current_step", "output", "error", "updated_at", "recoveries"}
)
_SYNC_MODES: Final = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}
_ACTIVE: Final = "state IN ('started', 'running', 'compensating')"


def migrations(dialect: str = "sqlite") -> list[tuple[int, str]]:
    """The numbered SQL migrations shipped with sagakit for ``dialect``, in order."""
    folder = resources.files(f"sagakit.store.migrations.{dialect}")
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            found.append((int(item.name.split("_", 1)[0]), item.read_text()))
    return sorted(found)


def _wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL. On a fresh file another process opening it at the same time may hold
    the lock this needs, and the switch fails at once (the busy timeout does not apply)."""
    for _ in range(200):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            time.sleep(0.05)
    conn.execute("PRAGMA journal_mode = WAL")


def _statements(script: str) -> list[str]:
    """The statements of a migration script, whole: a trigger's body has ';' of its own."""
    code = "\n".join(line.split("--", 1)[0] for line in script.splitlines())
    found, buffer = [], ""
    for piece in code.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \n;"):
                found.append(buffer)
            buffer = ""
    return found


def _append(
    conn: sqlite3.Connection, saga_id: str, entries: Sequence[Entry], owner: str | None
) -> None:
    changes = row_changes(entries)
    if made_progress(entries):
        changes["recoveries"] = 0
    if "error" in changes:
        changes["error"] = json.dumps(changes["error"])
    cols = [c for c in changes if c in _ROW_COLUMNS]
    sets = ", ".join(f"{c} = ?" for c in cols)
    values = [*(changes[c] for c in cols), saga_id]
    if owner is None:
        cur = conn.execute(f"UPDATE sagakit_sagas SET {sets} WHERE id = ?", values)
    else:
        cur = conn.execute(
            f"UPDATE sagakit_sagas SET {sets} WHERE id = ? AND owner = ?", [*values, owner]
        )
    if cur.rowcount == 0:
        raise FencedOut(saga_id, owner or "-")
    conn.executemany(_INSERT_ENTRY, [rows.entry_row(e) for e in entries])


def _create(conn: sqlite3.Connection, r: SagaRecord, first: Entry) -> tuple[SagaRecord, bool]:
    cur = conn.execute(
        f"INSERT INTO sagakit_sagas ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT (idempotency_key) DO NOTHING",
        rows.saga_row(r),
    )
    if cur.rowcount == 0:
        existing = _saga_where(conn, "idempotency_key", r.idempotency_key)
        assert existing is not None  # the conflict was on this key, and rows are not deleted
        return existing, False
    conn.execute(_INSERT_ENTRY, rows.entry_row(first))
    return r, True


def _saga_where(
    conn: sqlite3.Connection, column: Literal["id", "idempotency_key"], value: str | None
) -> SagaRecord | None:
    """The saga whose ``column`` (both are unique and indexed) is ``value``, or None."""
    found = conn.execute(f"SELECT {_COLS} FROM sagakit_sagas WHERE {column} = ?", (value,))
    row = found.fetchone()
    return None if row is None else rows.record(row)


def _journals(conn: sqlite3.Connection, ids: Sequence[str]) -> dict[str, list[Entry]]:
    found: dict[str, list[Entry]] = {i: [] for i in ids}
    marks = ",".join("?" * len(ids))
    for row in conn.execute(
        f"SELECT {rows.JOURNAL_COLUMNS} FROM sagakit_journal WHERE saga_id IN ({marks}) "
        "ORDER BY saga_id, idx",
        list(ids),
    ):
        found[row[0]].append(rows.entry(row))
    return found


def _claim(
    conn: sqlite3.Connection,
    owner: str,
    limit: int,
    only: Sequence[str] | None,
    without: Sequence[str],
    *,
    suspects: bool,
    suspect_after: int,
    now: float,
) -> list[SagaRecord]:
    """Take up to ``limit`` active sagas not owned by ``owner``, of the types ``only`` (None:
    any) and not of the types ``without``. Only one process executes the file, so a saga owned
    by any other worker id was held by a process that has since died: taking it over is a
    recovery."""
    if limit <= 0:
        return []
    # Counted as this claim leaves it: a takeover from another owner adds one.
    where = [
        "AND coalesce(wake_at, 0) <= ?",  # ready: a range of index sagakit_sagas_ready
        f"AND recoveries + (owner IS NOT NULL) {'>=' if suspects else '<'} ?",
    ]
    args: list[Any] = [owner, owner, now, suspect_after]
    if only is not None:
        where.append(f"AND saga_type IN ({','.join('?' * len(only))})")
        args += only
    if without:
        where.append(f"AND saga_type NOT IN ({','.join('?' * len(without))})")
        args += without
    claimed = conn.execute(
        "UPDATE sagakit_sagas SET owner = ?, wake_at = NULL, "
        "recoveries = recoveries + (owner IS NOT NULL), "
        "takeovers = takeovers + (owner IS NOT NULL) "
        # The planner, without statistics, would take the state index and sort every active
        # saga, waiting ones included; the ready index's range ends at now.
        "WHERE id IN (SELECT id FROM sagakit_sagas INDEXED BY sagakit_sagas_ready "
        f"WHERE {_ACTIVE} AND (owner IS NULL OR owner != ?) {' '.join(where)} "
        "ORDER BY coalesce(wake_at, 0), created_at, id LIMIT ?) "
        f"RETURNING {_COLS}",
        [*args, limit],
    ).fetchall()
    return [rows.record(r) for r in claimed]


class SqliteStore:
    """SQLite store. ``durability`` is ``"full"`` (fsync on every commit, the default),
    ``"normal"`` (WAL without fsync per commit: survives a process crash, not power loss)."""

    def __init__(
        self,
        path: str,
        *,
        durability: str = "full",
        lazy_delay: float = 0.005,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if durability not in _SYNC_MODES:
            raise ConfigurationError(
                f"durability must be one of {sorted(_SYNC_MODES)}, got {durability!r}"
            )
        self.path = path
        self.location = f"sqlite:///{path}"
        self.worker_id = new_worker_id()
        self._sync = _SYNC_MODES[durability]
        self._writer = GroupCommitWriter(self._connect, self.location, lazy_delay)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sagakit-sqlite-reader")
        self._reader_conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._owner: str | None = None  # set while this store is the executing worker
        self._opened = False
        self.clock = clock

    # -- lifecycle ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute(f"PRAGMA synchronous = {self._sync}")
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        """Create or migrate the database and start the writer thread."""
        if self._opened:
            return
        await self._read(self._migrate, opening=True)
        self._writer.start(asyncio.get_running_loop())
        self._opened = True

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
        if (found := self._schema_version(conn)) > latest:
            raise SchemaTooNew(self.location, found, latest)
        _wal(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS sagakit_schema (version INTEGER NOT NULL)")
            current = self._schema_version(conn)
            if current > latest:
                raise SchemaTooNew(self.location, current, latest)
            for number, sql in available:
                if number > current:
                    for statement in _statements(sql):
                        conn.execute(statement)
                    conn.execute("INSERT INTO sagakit_schema (version) VALUES (?)", (number,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def schema_version(self) -> int:
        return await self._read(self._schema_version)

    async def close(self) -> None:
        """Commit everything queued, then stop the threads. Closing twice, or closing a
        store that never opened, does nothing more."""
        self._opened = False
        await self._writer.stop()
        await asyncio.get_running_loop().run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=True)  # no thread outlives the store
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sagakit-sqlite-reader")
        self.release_ownership()

    def _close_reader(self) -> None:
        if self._reader_conn is not None:
            self._reader_conn.close()
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

    async def start_worker(self, wake: Callable[[], None]) -> None:
        """Take the file lock (:class:`DatabaseOwned` if another process holds it). Other
        processes cannot notify this one: the runner's polling finds their sagas."""
        self.acquire_ownership()
        self._owner = self.worker_id

    def lease_held(self) -> bool:
        return True  # the file lock is the lease, and the operating system keeps it for us

    async def stop_worker(self) -> None:
        if self._owner is None:
            return
        owner, self._owner = self._owner, None
        await self._writer.submit(
            lambda conn: conn.execute(
                f"UPDATE sagakit_sagas SET owner = NULL WHERE owner = ? AND {_ACTIVE}", (owner,)
            )
        )
        self.release_ownership()

    # -- writing -----------------------------------------------------------------------------

    async def create(self, record: SagaRecord, first: Entry) -> tuple[SagaRecord, bool]:
        return await self._writer.submit(lambda conn: _create(conn, record, first))

    async def append(self, saga_id: str, entries: Sequence[Entry]) -> None:
        owner = self._owner
        await self._writer.submit(lambda conn: _append(conn, saga_id, entries, owner), saga_id)

    def append_soon(self, saga_id: str, entries: Sequence[Entry]) -> None:
        owner = self._owner
        self._writer.submit_soon(lambda conn: _append(conn, saga_id, entries, owner), saga_id)

    async def append_checked(self, saga_id: str, decide: Decide) -> SagaRecord:
        def apply(conn: sqlite3.Connection) -> SagaRecord:
            select = f"SELECT {_COLS} FROM sagakit_sagas WHERE id = ?"
            row = conn.execute(select, (saga_id,)).fetchone()
            if row is None:
                raise SagaNotFound(saga_id)
            entries = decide(rows.record(row), _journals(conn, [saga_id])[saga_id])
            _append(conn, saga_id, entries, None)
            conn.execute(
                "UPDATE sagakit_sagas SET owner = NULL, wake_at = NULL WHERE id = ?", (saga_id,)
            )
            return rows.record(conn.execute(select, (saga_id,)).fetchone())

        return await self._writer.submit(apply)

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
        how: dict[str, Any] = {
            "suspects": suspects,
            "suspect_after": suspect_after,
            "now": self.clock.now(),
        }

        def apply(conn: sqlite3.Connection) -> list[Claimed]:
            found: list[SagaRecord] = []
            for saga_type, cap in caps.items():
                room = cap.worker
                if cap.cluster is not None:
                    owned = conn.execute(
                        f"SELECT count(*) FROM sagakit_sagas WHERE {_ACTIVE} "
                        "AND saga_type = ? AND owner = ?",
                        (saga_type, owner),
                    ).fetchone()[0]
                    room = min(room, cap.cluster - owned)
                if room > 0:
                    room = min(room, limit - len(found))
                    found += _claim(conn, owner, room, [saga_type], (), **how)
            rest = limit - len(found)
            found += _claim(conn, owner, rest, None, list(caps), **how)
            found.sort(key=lambda r: (r.created_at, r.id))
            journals = _journals(conn, [r.id for r in found]) if found else {}
            return [Claimed(record=r, journal=journals[r.id]) for r in found]

        return await self._writer.submit(apply)

    async def adopt(self, running: Collection[str], limit: int) -> list[Claimed]:
        owner = self._owner
        if owner is None:
            return []

        def q(conn: sqlite3.Connection) -> list[Claimed]:
            owned = conn.execute(
                f"SELECT {_COLS} FROM sagakit_sagas WHERE owner = ? AND {_ACTIVE} "
                "ORDER BY created_at, id",
                (owner,),
            )
            found = [r for r in map(rows.record, owned) if r.id not in running][:limit]
            journals = _journals(conn, [r.id for r in found]) if found else {}
            return [Claimed(record=r, journal=journals[r.id]) for r in found]

        return await self._read(q)

    async def release(self, saga_ids: Sequence[str]) -> None:
        owner = self._owner

        def apply(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE sagakit_sagas SET owner = NULL WHERE id = ? AND owner = ?",
                [(i, owner) for i in saga_ids],
            )

        await self._writer.submit(apply)

    # -- reading -----------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T], *, opening: bool = False) -> T:
        if not (self._opened or opening):
            raise StoreError("the store is not open; use `async with App(...)` or await app.open()")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, self._in_reader, fn)

    def _in_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if self._reader_conn is None:
                self._reader_conn = self._connect()
            return fn(self._reader_conn)
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc) or "malformed" in str(exc):
                raise StoreError(f"{self.path} is not a sagakit database ({exc})") from exc
            raise StoreError(f"reading {self.location} failed: {exc}") from exc

    async def get(self, saga_id: str) -> SagaRecord | None:
        return await self._read(lambda conn: _saga_where(conn, "id", saga_id))

    async def by_idempotency_key(self, key: str) -> SagaRecord | None:
        return await self._read(lambda conn: _saga_where(conn, "idempotency_key", key))

    async def journal(self, saga_id: str) -> list[Entry]:
        return await self._read(lambda conn: _journals(conn, [saga_id])[saga_id])

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
            f"SELECT {_COLS} FROM sagakit_sagas {clause} "
            "ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
        )

        def q(conn: sqlite3.Connection) -> list[SagaRecord]:
            return [rows.record(r) for r in conn.execute(sql, [*args, limit, offset]).fetchall()]

        return await self._read(q)

    async def counts(self, saga_type: str | None = None) -> dict[str, int]:
        def q(conn: sqlite3.Connection) -> dict[str, int]:
            if saga_type is None:
                found = conn.execute("SELECT state, count(*) FROM sagakit_sagas GROUP BY state")
            else:
                found = conn.execute(
                    "SELECT state, count(*) FROM sagakit_sagas WHERE saga_type = ? GROUP BY state",
                    (saga_type,),
                )
            return dict(found.fetchall())

        return await self._read(q)

    # -- timers, signals, children (the SQL is in sqlite_waits) --------------------------------

    def clock_bounds(self) -> tuple[float, float]:
        now = self.clock.now()  # this process's clock judges the timers too
        return now, now

    async def suspend(
        self,
        saga_id: str,
        wake_at: float,
        signals: Mapping[str, int],
        children: Sequence[str],
    ) -> None:
        owner = self._owner
        await self._writer.submit(
            lambda conn: waits.suspend(
                conn, saga_id, owner=owner, wake_at=wake_at, signals=signals, children=children
            ),
            saga_id,
        )

    async def wake(self, saga_id: str) -> None:
        await self._writer.submit(lambda conn: waits.wake(conn, saga_id))

    async def next_wake(self) -> float | None:
        return await self._read(waits.next_wake)

    async def send_signal(
        self, saga_id: str, signal_id: str, name: str, payload: str | None, at: float
    ) -> bool:
        return await self._writer.submit(
            lambda conn: waits.send_signal(
                conn, saga_id, signal_id=signal_id, name=name, payload=payload, at=at
            )
        )

    async def signals(self, saga_id: str, name: str | None = None) -> list[Signal]:
        return await self._read(lambda conn: waits.signals(conn, saga_id, name))

    async def outbox_claim(self, limit: int, lease: float) -> list[OutboxMessage]:
        now = time.time()  # the relay's own time, not the sagas' (which a test may skip)
        return await self._writer.submit(lambda conn: waits.outbox_claim(conn, limit, lease, now))

    async def outbox_done(self, ids: Sequence[int]) -> None:
        await self._writer.submit(lambda conn: waits.outbox_done(conn, ids))

    async def outbox_stats(self) -> tuple[int, float | None]:
        return await self._read(waits.outbox_stats)

    async def cancel_requests(self, after: int) -> list[Signal]:
        return await self._read(lambda conn: waits.cancel_requests(conn, after))
