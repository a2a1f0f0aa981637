"""Runs one failure point's saga to rest on explore's scratch store.

The driver is a worker of one saga: it builds a :class:`~sagakit.engine.SagaRun` from the
journal, as recovery does, and runs it. When the run dies at a simulated crash it builds a new
one from what the journal kept; when the saga unloads to wait (a remote step's reply, a durable
timer, a signal's timeout, a child saga), it has the services it was given answer the saga's
commands (:mod:`sagakit.testing.services`), sends the signals it was given, runs the children
to rest (without faults: the point is the parent's) or skips the point's clock to the wake-up
(a remote step's timeout, say), and runs it again, as a worker claiming the saga then would.
While a run goes on, the clock skips to the next sleeper (a back-off) whenever no step body is
in flight.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, cast

from sagakit.codec import decode
from sagakit.definition import Saga
from sagakit.engine import SagaRun
from sagakit.errors import ConfigurationError
from sagakit.journal import ACTIVE, TERMINAL, Entry, Kind, SagaState, project
from sagakit.middleware import Middleware
from sagakit.store.base import WAIT_FOREVER, SagaRecord, Store
from sagakit.testing.faults import LIFE, FaultyStore, Injector, Probe, Tracker, is_crash
from sagakit.testing.services import Services
from sagakit.testing.timeskip import SkipClock

AT_REST = TERMINAL | {SagaState.NEEDS_ATTENTION}
MAX_RUNS = 200  # runs of one point (recoveries and wake-ups) before it counts as stuck
POLL = 0.001  # real seconds between looks at a run in progress
FOREVER = WAIT_FOREVER  # the wake-up of a wait without timeout: nothing to skip to
_RUN_PARAMS = frozenset(inspect.signature(SagaRun).parameters)


@dataclass(frozen=True, slots=True, kw_only=True)
class Drive:
    """Where one point's saga ended: ``state`` None and ``stuck`` saying why if it never came
    to rest."""

    journal: list[Entry]
    state: SagaState | None
    crashes: int
    stuck: str | None = None


class _PointStore(FaultyStore):
    """The point's store judges time by the point's clock (each point skips its own)."""

    def __init__(self, inner: Store, probe: Probe, clock: SkipClock) -> None:
        super().__init__(inner, probe)
        self.clock = clock

    def clock_bounds(self) -> tuple[float, float]:
        now = self.clock.now()
        return now, now


class Driver:
    """Runs sagas of one definition, one failure point at a time."""

    def __init__(
        self,
        *,
        store: Store,
        saga: Saga,
        middleware: Sequence[Middleware],
        executor: Executor,
        resolve: Callable[[str, int | None], Saga | None],
        signals: Mapping[str, str] | None = None,
        services: Services | None = None,
    ) -> None:
        if "middleware" not in _RUN_PARAMS:
            raise ConfigurationError(
                "this sagakit engine takes no middleware, which explore needs to inject errors"
            )
        self.store = store
        self.saga = saga
        self.middleware = tuple(middleware)
        self.executor = executor
        self.resolve = resolve
        self.signals = dict(signals or {})  # name -> encoded payload
        self.services = services

    async def start(self, payload: str, clock: SkipClock) -> SagaRecord:
        """Create a saga with ``payload`` (its encoded input), as ``App.start`` would."""
        now, saga = clock.now(), self.saga
        record = SagaRecord(
            id=str(uuid.uuid4()),
            saga_type=saga.name,
            version=saga.version,
            state=SagaState.STARTED,
            idempotency_key=None,
            input=payload,
            output=None,
            error=None,
            current_step=None,
            deadline=None if saga.deadline is None else now + saga.deadline,
            created_at=now,
            updated_at=now,
        )
        first = Entry(
            saga_id=record.id,
            index=0,
            kind=Kind.SAGA_STARTED,
            at=now,
            payload=payload,
            data={"version": saga.version},
        )
        stored, _ = await self.store.create(record, first)
        return stored

    async def drive(self, record: SagaRecord, probe: Probe, clock: SkipClock) -> Drive:
        """Run the saga to rest through the crashes and waits of ``probe``'s point."""
        store = _PointStore(self.store, probe, clock)
        crashes, grown = 0, -1
        for _ in range(MAX_RUNS):
            journal = await self.store.journal(record.id)
            run = self._run(record, journal, store, probe, clock)
            try:
                state = await self._execute(run, probe, clock)
            except BaseException as exc:
                if not is_crash(exc):
                    raise
                crashes += 1
                continue
            await store.flush(record.id)
            journal = await self.store.journal(record.id)
            if state in AT_REST:
                return Drive(journal=journal, state=state, crashes=crashes)
            if (
                await self._answer(record.id, journal, probe, clock)
                or await self._deliver(record.id, journal, clock)
                or await self._children(record.id, probe, clock)
            ):
                continue
            wake_at = getattr(run, "wake_at", None)
            if wake_at is None or wake_at >= FOREVER or len(journal) == grown:
                return Drive(journal=journal, state=None, crashes=crashes, stuck=_waits(journal))
            grown = len(journal)
            clock.skip_to(wake_at)
        journal = await self.store.journal(record.id)
        stuck = f"it was still moving after {MAX_RUNS} runs"
        return Drive(journal=journal, state=None, crashes=crashes, stuck=stuck)

    async def _answer(
        self, saga_id: str, journal: list[Entry], probe: Probe, clock: SkipClock
    ) -> bool:
        """Have the services answer the saga's commands; return whether a reply was stored."""
        if self.services is None:
            return False
        return await self.services.deliver(self.store, saga_id, journal, probe, clock)

    async def _deliver(self, saga_id: str, journal: list[Entry], clock: SkipClock) -> bool:
        """Send each signal the saga waits for that explore was given a payload for (once per
        wait, whatever crashes happen); return whether one was sent."""
        p = project(journal)
        sent = False
        for seq, e in p.waits.items():
            if e.kind is not Kind.SIGNAL_WAITING or seq in p.outcomes:
                continue
            # A wait for any of several signals journals their names joined by "|".
            wanted = str((e.data or {}).get("name", "")).split("|")
            name = next((n for n in wanted if n in self.signals), None)
            if name is not None:
                signal_id = f"sagakit.testing/{seq}"
                payload = self.signals[name]
                sent |= await self.store.send_signal(saga_id, signal_id, name, payload, clock.now())
        return sent

    async def _children(self, saga_id: str, probe: Probe, clock: SkipClock) -> bool:
        """Run the saga's unfinished child sagas to rest, without faults (the point is the
        parent's); return whether one came to rest (a stuck child leaves the parent stuck)."""
        rested = False
        for state in ACTIVE:
            for child in await self.store.list_sagas(state=state, limit=10_000):
                saga = self.resolve(child.saga_type, child.version)
                if child.parent_id != saga_id or saga is None:
                    continue
                driver = Driver(
                    store=self.store,
                    saga=saga,
                    middleware=self.middleware,
                    executor=self.executor,
                    resolve=self.resolve,
                    signals=self.signals,
                    services=self.services,
                )
                drive = await driver.drive(child, Probe(f"{probe.point}/child"), clock)
                rested = rested or drive.state is not None
        return rested

    def _run(
        self,
        record: SagaRecord,
        journal: list[Entry],
        store: FaultyStore,
        probe: Probe,
        clock: SkipClock,
    ) -> SagaRun:
        kwargs: dict[str, Any] = {
            # FaultyStore forwards the rest of the Store protocol to the real store.
            "store": cast("Store", store),
            "saga": self.saga,
            "saga_id": record.id,
            "data": decode(record.input, self.saga.input_type),
            "deadline": record.deadline,
            "journal": journal,
            "executor": self.executor,
            "middleware": (Tracker(probe), *self.middleware, Injector(probe)),
            "clock": clock,
            "resolve": self.resolve,
        }
        return SagaRun(**{k: v for k, v in kwargs.items() if k in _RUN_PARAMS})

    async def _execute(self, run: SagaRun, probe: Probe, clock: SkipClock) -> SagaState:
        context = contextvars.copy_context()
        context.run(LIFE.set, probe.life)
        task = asyncio.create_task(run.execute(), context=context)
        idle = 0
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL)
                if done:
                    return task.result()
                clock.wake_due()
                # Two looks in a row with no step body in flight: only sleepers are left.
                idle = idle + 1 if probe.in_flight == 0 else 0
                if idle >= 2 and clock.skip_to_next():
                    idle = 0
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})


def _waits(journal: list[Entry]) -> str:
    """Why a saga that did not come to rest stopped, in words."""
    p = project(journal)
    for seq, e in p.waits.items():
        if seq in p.outcomes:
            continue
        if e.kind is Kind.SIGNAL_WAITING:
            name = (e.data or {}).get("name")
            return f"it waits for signal {name!r}, which explore does not send"
        return f"it waits ({e.kind.value}) and nothing wakes it"
    replies = [
        *(d for seq, d in p.started_data.items() if seq not in p.outcomes),
        *(d for seq, d in p.compensation_data.items() if seq not in p.compensated),
    ]
    for data in replies:
        if data.get("topic"):
            return f"it waits for the reply to {data['topic']}, which never came (no timeout)"
    return "it stopped without coming to rest"
