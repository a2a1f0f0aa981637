"""Runs the sagas of one database in this process: launch, recover, poll, shut down.

On SQLite one process owns a database's sagas (a file lock says which). Its runner resumes
every started, running or compensating saga from the journal when it starts, runs sagas this
process starts at once, and polls for sagas that other processes started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from sagakit.codec import decode, error_info
from sagakit.definition import Saga
from sagakit.engine import SagaRun
from sagakit.errors import ConfigurationError, PayloadError
from sagakit.journal import Entry, Kind, SagaState
from sagakit.store.base import SagaRecord, Store

log = logging.getLogger("sagakit.worker")


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """Where a saga run in this process came to rest."""

    state: SagaState
    output: str | None
    error: dict[str, Any] | None


# Entries after which a saga does not move until an operator acts (or ever).
_AT_REST = frozenset(
    {
        Kind.SAGA_COMPLETED,
        Kind.SAGA_FAILED,
        Kind.SAGA_PARKED,
        Kind.COMPENSATION_EXHAUSTED,
        Kind.OPERATOR_RESOLVED,
    }
)

Resolve = Callable[[str, int], Saga | None]


class Runner:
    """Executes sagas as asyncio tasks, at most ``max_concurrency`` at a time."""

    def __init__(
        self,
        store: Store,
        resolve: Resolve,
        *,
        max_concurrency: int,
        poll_interval: float,
        executor: Executor | None,
    ) -> None:
        if max_concurrency < 1:
            raise ConfigurationError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.store = store
        self.resolve = resolve
        self.poll_interval = poll_interval
        self.executor = executor
        self.tasks: dict[str, asyncio.Task[Outcome | None]] = {}
        self._slots = asyncio.Semaphore(max_concurrency)
        self._poller: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def launch(
        self, record: SagaRecord, first: Entry | None = None
    ) -> asyncio.Task[Outcome | None]:
        """Run ``record``'s saga unless it already runs here. ``first`` is its only journal
        entry when the saga was just created, which saves reading the journal back."""
        task = self.tasks.get(record.id)
        if task is None:
            task = asyncio.create_task(self._run(record, first), name=f"saga-{record.id}")
            self.tasks[record.id] = task
        return task

    async def _run(self, record: SagaRecord, first: Entry | None) -> Outcome | None:
        try:
            async with self._slots:
                return await self._execute(record, first)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A store failure: the saga stays where its journal left it and is retried by the
            # next recovery pass.
            log.exception("saga %s stopped on an internal error; it will be recovered", record.id)
            return None
        finally:
            self.tasks.pop(record.id, None)

    async def _execute(self, record: SagaRecord, first: Entry | None) -> Outcome | None:
        journal = [first] if first is not None else await self.store.journal(record.id)
        if journal and journal[-1].kind in _AT_REST:
            return None  # a stale launch: it finished, or waits for an operator
        saga = self.resolve(record.saga_type, record.version)
        if saga is None:
            reason = (
                f"saga type {record.saga_type!r} version {record.version} is not registered in "
                "this process; deploy code that registers it, then `sagakit retry` the saga"
            )
            await self._park(record, len(journal), ConfigurationError(reason))
            return None
        try:
            data = decode(record.input, saga.input_type)
        except PayloadError as exc:
            await self._park(record, len(journal), exc)
            return None
        run = SagaRun(
            store=self.store,
            saga=saga,
            saga_id=record.id,
            data=data,
            deadline=record.deadline,
            journal=journal,
            executor=self.executor,
        )
        state = await run.execute()
        return Outcome(state=state, output=run.output, error=run.error)

    async def _park(self, record: SagaRecord, index: int, reason: Exception) -> None:
        log.error("saga %s needs attention: %s", record.id, reason)
        entry = Entry(
            saga_id=record.id,
            index=index,
            kind=Kind.SAGA_PARKED,
            at=time.time(),
            error=error_info(reason),
        )
        await self.store.append(record.id, (entry,))

    async def recover(self) -> int:
        """Launch every active saga of the store that does not run here; return how many."""
        launched = 0
        after: tuple[float, str] | None = None
        while True:
            batch = await self.store.active(limit=500, after=after)
            if not batch:
                return launched
            for record in batch:
                if record.id not in self.tasks:
                    self.launch(record)
                    launched += 1
            after = (batch[-1].created_at, batch[-1].id)
            await asyncio.sleep(0)

    def start_polling(self) -> None:
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name="sagakit-poller")

    def wake(self) -> None:
        self._wake.set()

    async def _poll(self) -> None:
        while True:
            try:
                await self.recover()
            except Exception:
                log.exception("recovery pass failed; retrying in %.1fs", self.poll_interval)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def stop(self) -> None:
        """Stop at once: cancel every saga task; each resumes from its journal next time."""
        tasks: list[asyncio.Task[Any]] = list(self.tasks.values())
        if self._poller is not None:
            tasks.append(self._poller)
            self._poller = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
