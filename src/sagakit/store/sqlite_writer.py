"""The SQLite group-commit writer: one thread, one connection, many sagas per transaction.

It takes every write queued while the previous transaction was committing and commits them
together, then wakes each waiting saga: one fsync serves many sagas. Writes queued without a
future (``submit_soon``) wake no one; the writer holds them briefly so they ride along with the
next durable write instead of costing an fsync of their own.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

from sagakit.errors import StoreError

log = logging.getLogger("sagakit.store")
T = TypeVar("T")
Apply = Callable[[sqlite3.Connection], Any]


class _Op:
    __slots__ = ("apply", "error", "future", "key", "result")

    def __init__(self, apply: Apply, future: asyncio.Future[Any] | None, key: str | None) -> None:
        self.apply = apply
        self.key = key
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
                log.warning("a queued journal write was refused: %s", op.error)
            continue
        if op.error is None:
            fut.set_result(op.result)
        else:
            fut.set_exception(op.error)


class GroupCommitWriter:
    """Runs write functions on one connection in a thread, batching them into transactions."""

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], location: str, lazy_delay: float
    ) -> None:
        self._connect = connect
        self._location = location
        self._lazy_delay = lazy_delay
        self._drain_wait = 0.002
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: dict[str, BaseException] = {}  # writer thread only

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="sagakit-sqlite-writer")
        self._thread.daemon = True
        self._thread.start()

    async def stop(self) -> None:
        """Commit everything queued, then end the thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def submit(
        self, apply: Callable[[sqlite3.Connection], T], key: str | None = None
    ) -> asyncio.Future[T]:
        """Queue ``apply``; the future resolves once its transaction is committed.

        ``key`` names the saga the write belongs to: if an earlier queued write of the same
        key failed, this one fails with that error and is not applied, so that a saga's
        journal never has a hole that its writer did not hear about.
        """
        if self._thread is None or self._loop is None:
            raise StoreError("the store is not open; use `async with App(...)` or await app.open()")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Op(apply, fut, key))
        return fut

    def submit_soon(self, apply: Apply, key: str | None = None) -> None:
        """Queue ``apply`` without waiting; a later ``submit`` commits after it."""
        self._queue.put(_Op(apply, None, key))

    def _run(self) -> None:
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
        todo = [op for op in batch if not self._poisoned(op)]
        if not todo:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for op in todo:
                    op.result = op.apply(conn)
            except Exception:
                conn.execute("ROLLBACK")
                self._commit_isolated(conn, todo)
                return
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            err = StoreError(f"writing to {self._location} failed: {exc}")
            err.__cause__ = exc
            for op in todo:
                op.error = err
                self._remember(op)

    def _poisoned(self, op: _Op) -> bool:
        """Fail ``op`` if an earlier write of its saga failed unheard; a waited-on write
        reports it, after which the saga's writes go through again."""
        if op.key is None or op.key not in self._failed:
            return False
        op.error = self._failed[op.key]
        if op.future is not None:
            del self._failed[op.key]
        return True

    def _remember(self, op: _Op) -> None:
        if op.key is not None and op.future is None and op.error is not None:
            self._failed[op.key] = op.error

    def _commit_isolated(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        """Commit the batch with each op in its own savepoint, so one bad op fails alone (and
        the later writes of its saga with it)."""
        conn.execute("BEGIN IMMEDIATE")
        failed: dict[str, BaseException] = {}
        for op in batch:
            if op.key is not None and op.key in failed:
                op.error = failed[op.key]
                self._remember(op)
                continue
            conn.execute("SAVEPOINT op")
            try:
                op.result = op.apply(conn)
                op.error = None
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                op.error = exc
                if isinstance(exc, sqlite3.Error):
                    op.error = StoreError(f"writing to {self._location} failed: {exc}")
                    op.error.__cause__ = exc
                if op.key is not None:
                    failed[op.key] = op.error
                self._remember(op)
            conn.execute("RELEASE op")
        conn.execute("COMMIT")
