"""Runs sagas in this process: launch, claim, recover, retry after store outages, shut down.

A runner executes sagas as asyncio tasks. It runs the sagas this process starts at once, and
claims the others from the store: on start (recovery), when woken (a new saga, a retry), and
every ``poll_interval``. A saga whose run stopped on a store error (the database went away) is
run again from its journal once the store answers; one this worker no longer owns (fenced out)
is dropped. A saga that was taken over from dead workers more than ``max_recoveries`` times is
parked in ``needs_attention``: it may be what kills them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from sagakit.clock import SYSTEM_CLOCK, Clock
from sagakit.codec import decode, error_info
from sagakit.definition import Saga
from sagakit.engine import SagaRun
from sagakit.errors import (
    ConfigurationError,
    FencedOut,
    PayloadError,
    RecoveryLimitExceeded,
    StoreError,
)
from sagakit.journal import TERMINAL, Entry, Kind, SagaState
from sagakit.middleware import Middleware, SagaCall, chain_saga
from sagakit.remote import DEFAULT_REPLY_TOPIC
from sagakit.store.base import SagaRecord, Store, TypeCap

log = logging.getLogger("sagakit.worker")

CLAIM_BATCH = 200
ADOPT_EVERY = 30  # polls between looks for sagas this worker owns but does not run


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

Resolve = Callable[[str, int | None], Saga | None]


def _no_relay() -> None:
    log.error(
        "a remote step wrote a command, but this App has no broker: the command waits in the "
        "outbox until an App with App(broker=...) runs; give this App the broker URL"
    )


# The capped saga types: type -> (cluster-wide cap, per-worker cap)
Caps = Callable[[], dict[str, tuple[int | None, int | None]]]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunnerSettings:
    max_concurrency: int = 1000
    poll_interval: float = 1.0
    max_recoveries: int = 5
    retry_interval: float = 0.5  # first wait before re-running a saga after a store error


class Runner:
    """Executes sagas as asyncio tasks, at most ``max_concurrency`` at a time."""

    def __init__(
        self,
        store: Store,
        resolve: Resolve,
        settings: RunnerSettings,
        executor: Executor | None,
        caps: Caps = dict,
        *,
        clock: Clock = SYSTEM_CLOCK,
        middleware: tuple[Middleware, ...] = (),
        reply_topic: str = DEFAULT_REPLY_TOPIC,
        on_command: Callable[[], None] | None = None,
    ) -> None:
        if settings.max_concurrency < 1:
            raise ConfigurationError(
                f"max_concurrency must be >= 1, got {settings.max_concurrency}"
            )
        self.store = store
        self.resolve = resolve
        self.settings = settings
        self.executor = executor
        self.caps = caps
        self.clock = clock
        self.middleware = middleware
        self.reply_topic = reply_topic
        self.on_command = on_command or _no_relay
        self.tasks: dict[str, asyncio.Task[Outcome | None]] = {}
        self.runs: dict[str, SagaRun] = {}
        # Sagas claimed again while their last run here was still ending (it unloaded them
        # just before a signal or a child woke them): run again when it has ended.
        self._again: dict[str, SagaRecord] = {}
        self._cancels: dict[str, str] = {}  # saga id -> reason, for cancels not yet taken
        self._cancel_cursor = 0
        self._by_type: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._poller: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Sagas this worker owns whose run stopped on a store error: id -> (record, attempts)
        self._orphans: dict[str, tuple[SagaRecord, int]] = {}
        self._suspects: set[str] = set()  # see journal.SUSPECT_AFTER; at most one runs
        self._adopt_due = False  # set when a claim's reply may have been lost

    def launch(
        self, record: SagaRecord, journal: list[Entry] | None = None
    ) -> asyncio.Task[Outcome | None]:
        """Run ``record``'s saga unless it already runs here. ``journal`` saves reading it."""
        task = self.tasks.get(record.id)
        if task is None:
            task = asyncio.create_task(self._run(record, journal), name=f"saga-{record.id}")
            self.tasks[record.id] = task
            self._by_type[record.saga_type] += 1
        elif journal is not None and len(journal) > 1:
            self._again[record.id] = record  # claimed again: see _again
        return task

    async def _run(self, record: SagaRecord, journal: list[Entry] | None) -> Outcome | None:
        try:
            async with self._slots:
                outcome = await self._execute(record, journal)
            self._orphans.pop(record.id, None)
            return outcome
        except FencedOut as exc:
            log.warning("dropping saga %s: %s", record.id, exc)
            self._orphans.pop(record.id, None)
            return None
        except (StoreError, OSError) as exc:
            log.warning("saga %s stopped on a store error (%s); it resumes from its journal "
                        "when the store answers (try %d)", record.id, exc,
                        self._orphan(record))  # fmt: skip
            return None
        except Exception:
            log.exception("saga %s stopped on an internal error; it resumes later (try %d)",
                          record.id, self._orphan(record))  # fmt: skip
            return None
        finally:
            self.tasks.pop(record.id, None)
            self.runs.pop(record.id, None)
            self._suspects.discard(record.id)
            self._by_type[record.saga_type] -= 1
            if record.saga_type in self.caps():
                self.wake()  # room for another saga of a capped type
            again = self._again.pop(record.id, None)
            if again is not None:
                self.launch(again)

    def _orphan(self, record: SagaRecord) -> int:
        """Remember a saga to re-run from its journal; return how often its run stopped."""
        tries = self._orphans.get(record.id, (record, 0))[1] + 1
        self._orphans[record.id] = (record, tries)
        return tries

    async def _execute(self, record: SagaRecord, journal: list[Entry] | None) -> Outcome | None:
        if journal is None:
            journal = await self.store.journal(record.id)
        if journal and journal[-1].kind in _AT_REST:
            return None  # a stale launch: it finished, or waits for an operator
        if record.recoveries > self.settings.max_recoveries:
            await self._park(record, journal, RecoveryLimitExceeded(record.id, record.recoveries))
            return None
        saga = self.resolve(record.saga_type, record.version)
        if saga is None:
            reason = (
                f"saga type {record.saga_type!r} version {record.version} is not registered in "
                "this process; deploy code that registers it, then `sagakit retry` the saga"
            )
            await self._park(record, journal, ConfigurationError(reason))
            return None
        try:
            data = decode(record.input, saga.input_type)
        except PayloadError as exc:
            await self._park(record, journal, exc)
            return None
        run = SagaRun(
            store=self.store,
            saga=saga,
            saga_id=record.id,
            data=data,
            deadline=record.deadline,
            journal=journal,
            executor=self.executor,
            clock=self.clock,
            middleware=self.middleware,
            resolve=self.resolve,
            cancel=self._cancels.get(record.id),
            notify=self.wake,
            reply_topic=self.reply_topic,
            on_command=self.on_command,
        )
        self.runs[record.id] = run
        if self.middleware:
            call = SagaCall(saga_id=record.id, saga_type=saga.name, version=saga.version)
            state = await chain_saga(self.middleware, call, run.execute)()
        else:
            state = await run.execute()
        if run.wake_at is not None:
            self.wake()  # look at the next wake-up again
        elif state in TERMINAL:
            self._cancels.pop(record.id, None)
            if record.parent_id is not None:
                await self.store.wake(record.parent_id)
                self.wake()
        return Outcome(state=state, output=run.output, error=run.error)

    async def _park(self, record: SagaRecord, journal: list[Entry], reason: Exception) -> None:
        log.error("saga %s needs attention: %s", record.id, reason)
        index = journal[-1].index + 1 if journal else 0
        entry = Entry(saga_id=record.id, index=index, kind=Kind.SAGA_PARKED, at=time.time(),
                      error=error_info(reason))  # fmt: skip
        await self.store.append(record.id, (entry,))

    async def recover(self) -> int:
        """Claim sagas no live worker owns, re-run orphans, adopt lost claims when due, and
        take one suspect if none runs here; return how many sagas were launched."""
        launched = self._relaunch_orphans()
        await self._take_cancels()
        if self._adopt_due:
            adopted = await self.store.adopt(list(self.tasks), CLAIM_BATCH)
            self._adopt_due = False
            for c in adopted:
                self.launch(c.record, c.journal)
            launched += len(adopted)
        while True:
            free = self.settings.max_concurrency - len(self.tasks)
            if free <= 0:
                return launched
            claimed = await self.store.claim(
                min(CLAIM_BATCH, free),
                self._type_caps(),
                suspect_after=self.settings.max_recoveries,
            )
            for c in claimed:
                self.launch(c.record, c.journal)
            launched += len(claimed)
            if len(claimed) < min(CLAIM_BATCH, free):
                break
        if not self._suspects and len(self.tasks) < self.settings.max_concurrency:
            suspects = await self.store.claim(
                1, self._type_caps(), suspects=True, suspect_after=self.settings.max_recoveries
            )
            for c in suspects:
                self._suspects.add(c.record.id)
                self.launch(c.record, c.journal)
                launched += 1
        return launched

    async def _take_cancels(self) -> None:
        """Learn of cancel requests (any process may send them) and pass them on to the
        sagas running here; the others get theirs when they are launched."""
        for request in await self.store.cancel_requests(self._cancel_cursor):
            self._cancel_cursor = max(self._cancel_cursor, request.id)
            reason = str((decode(request.payload) or {}).get("reason", ""))
            self.cancel(request.saga_id, reason)

    def cancel(self, saga_id: str, reason: str) -> None:
        """Cancel a saga at its next step or wait if it runs here, else when it is launched."""
        self._cancels[saga_id] = reason
        run = self.runs.get(saga_id)
        if run is not None:
            run.request_cancel(reason)

    def _type_caps(self) -> dict[str, TypeCap]:
        caps = {}
        for saga_type, (cluster, per_worker) in self.caps().items():
            room = (per_worker or self.settings.max_concurrency) - self._by_type[saga_type]
            caps[saga_type] = TypeCap(cluster=cluster, worker=max(room, 0))
        return caps

    def _relaunch_orphans(self) -> int:
        due = [r for r, _ in self._orphans.values() if r.id not in self.tasks]
        for record in due:
            self.launch(record)
        return len(due)

    def start_polling(self) -> None:
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name="sagakit-poller")

    def wake(self) -> None:
        self._wake.set()

    async def _poll(self) -> None:
        failures = polls = 0
        while True:
            polls += 1
            self._adopt_due = self._adopt_due or polls % ADOPT_EVERY == 0
            try:
                await self.recover()
                failures = 0
            except Exception as exc:
                failures += 1
                self._adopt_due = True  # a claim whose reply was lost may have taken sagas
                expected = isinstance(exc, StoreError | OSError)
                log.warning("claiming sagas failed (%s); retrying", exc, exc_info=not expected)
            self._wake.clear()
            wait = self.settings.poll_interval
            if failures or self._orphans:
                wait = min(wait, self.settings.retry_interval * 2 ** min(failures, 5))
            await self._idle(wait, await self._next_due(failures))

    async def _next_due(self, failures: int) -> float | None:
        """Seconds until the next suspended saga falls due (by the store's clock), if soon."""
        if failures:
            return None
        with contextlib.suppress(StoreError, OSError):
            due = await self.store.next_wake()
            # Sagas already due but not claimed (over a cap) wait for the next poll.
            earliest = self.store.clock_bounds()[0]
            if due is not None and due > earliest - 0.05:
                return max(due - earliest, 0.005)
        return None

    async def _idle(self, poll: float, due_in: float | None) -> None:
        """Wait for a wake-up, ``poll`` seconds, or ``due_in`` seconds of the clock."""
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wake.wait())]
        if due_in is not None:
            waiters.append(asyncio.ensure_future(self.clock.sleep(due_in)))
        try:
            await asyncio.wait(waiters, timeout=poll, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def stop(self) -> None:
        """Stop at once: cancel every saga task; each resumes from its journal next time."""
        tasks: list[asyncio.Task[Any]] = list(self.tasks.values())
        if self._poller is not None:
            tasks.append(self._poller)
            self._poller = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
