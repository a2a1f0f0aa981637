"""Group commit on PostgreSQL: one task turns every queued write into one or two statements.

Appends of many sagas become a single statement (journal rows and saga-row updates for the
sagas this worker still owns), so a batch costs one round trip and one commit, whatever its
size. Writes queued without a future ride along with the next durable write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sagakit.errors import FencedOut, StoreUnavailable
from sagakit.journal import Entry, made_progress, row_changes
from sagakit.store import postgres_sql as sql
from sagakit.store import rows
from sagakit.store.base import SagaRecord

log = logging.getLogger("sagakit.store")

Execute = Callable[[str, Sequence[Any]], Awaitable[list[Any]]]


class Op:
    """A queued write: a create (``record``), an append, or, with no entries, a barrier that
    settles once the writes queued before it did."""

    __slots__ = ("entries", "future", "record", "saga_id")

    def __init__(
        self,
        saga_id: str,
        entries: Sequence[Entry],
        future: asyncio.Future[Any] | None,
        record: SagaRecord | None = None,
    ) -> None:
        self.saga_id = saga_id
        self.entries = entries
        self.future = future
        self.record = record


def _columns(entries: Sequence[Entry]) -> list[list[Any]]:
    return [list(col) for col in zip(*(rows.entry_row(e) for e in entries), strict=True)]


def append_args(ops: Sequence[Op], owner: str | None) -> list[Any]:
    """The parameters of :data:`sql.APPEND` for these ops, one row change per saga."""
    by_saga: dict[str, list[Entry]] = {}
    for op in ops:
        by_saga.setdefault(op.saga_id, []).extend(op.entries)
    changes = [(saga_id, row_changes(entries)) for saga_id, entries in by_saga.items()]
    entries = [e for op in ops for e in op.entries]
    return [
        *_columns(entries),
        [i for i, _ in changes],
        [c.get("state") for _, c in changes],
        [c.get("current_step") for _, c in changes],
        [c.get("output") for _, c in changes],
        [rows.dumps(c.get("error")) for _, c in changes],
        [c["updated_at"] for _, c in changes],
        ["current_step" in c for _, c in changes],
        ["output" in c for _, c in changes],
        ["error" in c for _, c in changes],
        [made_progress(by_saga[i]) for i, _ in changes],
        owner,
    ]


def create_args(ops: Sequence[Op]) -> list[Any]:
    records = [op.record for op in ops if op.record is not None]
    saga_columns = [list(col) for col in zip(*(rows.saga_row(r) for r in records), strict=True)]
    return [*_columns([e for op in ops for e in op.entries]), *saga_columns]


class PgWriter:
    """Batches appends and creates; ``execute(statement, args)`` runs one statement."""

    def __init__(self, execute: Execute, owner: Callable[[], str | None]) -> None:
        self._execute = execute
        self._owner = owner
        self._pending: list[Op] = []
        self._flushing: list[Op] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failed: dict[str, BaseException] = {}
        self.lazy_delay = 0.005

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sagakit-pg-writer")

    async def stop(self) -> None:
        """Commit what is queued, then stop."""
        if self._task is None:
            return
        self._closing = True
        self._ready.set()
        try:
            await self._task
        finally:
            self._task = None
            self._closing = False

    def submit(self, op: Op) -> None:
        """Queue ``op``. If an earlier queued (unwaited) write of the same saga failed, ``op``
        fails with that error instead, so a saga's journal never has a hole that its writer
        did not hear about; a waited-on write reports it, and the saga's writes go on."""
        failed = self._failed.get(op.saga_id)
        if failed is not None:
            if op.future is not None:
                del self._failed[op.saga_id]
            self._settle(op, failed)
            return
        self._pending.append(op)
        self._ready.set()

    async def drain(self, saga_id: str) -> None:
        """Return once the writes of ``saga_id`` queued so far are committed; raise the error
        of one that failed, as a durable append would."""
        queued = any(op.saga_id == saga_id for op in (*self._flushing, *self._pending))
        if not queued and saga_id not in self._failed:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submit(Op(saga_id, (), fut))
        await fut

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            if not self._closing and all(op.future is None for op in self._pending):
                # Only lazy writes: give a durable one a moment to join them.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._durable_arrived(), self.lazy_delay)
            await self._flush()
            if self._closing and not self._pending:
                return
            # Let the sagas just woken run up to their next write before the next batch.
            await asyncio.sleep(0)

    async def _durable_arrived(self) -> None:
        while all(op.future is None for op in self._pending):
            self._ready.clear()
            await self._ready.wait()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._ready.clear()
        # An op queued before an earlier write of its saga failed (in the batch before this
        # one) must not commit after the hole that failure left: it fails too.
        batch = [op for op in batch if not self._poisoned(op)]
        if not batch:
            return
        self._flushing = batch
        try:
            creates = [op for op in batch if op.record is not None]
            appends = [op for op in batch if op.record is None and op.entries]
            if creates:
                await self._guard(creates, self._create)
            if appends:
                await self._guard(appends, self._append)
        finally:
            self._flushing = []
        for op in batch:
            if op.record is None and not op.entries:  # a barrier: report what went before
                self._settle(op, self._failed.pop(op.saga_id, None))

    async def _guard(
        self, ops: list[Op], run: Callable[[list[Op]], Awaitable[dict[int, Any]]]
    ) -> None:
        try:
            results = await run(ops)
        except Exception as exc:
            sagas: dict[str, list[Op]] = {}
            for op in ops:
                sagas.setdefault(op.saga_id, []).append(op)
            if len(sagas) > 1 and not isinstance(exc, StoreUnavailable):
                for group in sagas.values():  # one bad saga must not fail the others
                    await self._guard(group, run)
                return
            for op in ops:
                self._settle(op, exc)
            return
        for i, op in enumerate(ops):
            self._settle(op, results.get(i))

    def _poisoned(self, op: Op) -> bool:
        """Fail ``op`` if an earlier write of its saga failed unheard (see :meth:`submit`)."""
        failed = self._failed.get(op.saga_id)
        if failed is None or op.record is not None or not op.entries:
            return False
        if op.future is not None:
            del self._failed[op.saga_id]
        self._settle(op, failed)
        return True

    def _settle(self, op: Op, result: Any) -> None:
        if isinstance(result, BaseException):
            if op.future is None:
                self._failed[op.saga_id] = result
                log.warning("a queued journal write was refused: %s", result)
            elif not op.future.done():
                op.future.set_exception(result)
        elif op.future is not None and not op.future.done():
            op.future.set_result(result)

    async def _append(self, ops: list[Op]) -> dict[int, Any]:
        written = {r[0] for r in await self._execute(sql.APPEND, append_args(ops, self._owner()))}
        owner = self._owner() or "-"
        return {
            i: None if op.saga_id in written else FencedOut(op.saga_id, owner)
            for i, op in enumerate(ops)
        }

    async def _create(self, ops: list[Op]) -> dict[int, Any]:
        inserted = {r[0] for r in await self._execute(sql.CREATE, create_args(ops))}
        results: dict[int, Any] = {}
        lost = [op for op in ops if op.record is not None and op.record.id not in inserted]
        existing: dict[str, SagaRecord] = {}
        if lost:
            keys = [op.record.idempotency_key for op in lost if op.record is not None]
            found = await self._execute(sql.BY_KEYS, [keys])
            existing = {r[4]: rows.record(r) for r in found}
        for i, op in enumerate(ops):
            assert op.record is not None
            if op.record.id in inserted:
                results[i] = (op.record, True)
            else:
                results[i] = (existing[op.record.idempotency_key or ""], False)
        return results
