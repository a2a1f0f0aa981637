"""App: configuration, the registry of saga definitions, and start/get/list/retry/resolve."""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from sagakit.clock import SYSTEM_CLOCK, Clock
from sagakit.codec import decode, encode
from sagakit.definition import Saga, Workflow
from sagakit.errors import (
    AppClosed,
    ConfigurationError,
    DatabaseOwned,
    DuplicateSagaType,
    InvalidInput,
    InvalidSagaState,
    PayloadError,
    SagaNotFound,
    UnknownSagaType,
)
from sagakit.handle import SagaHandle, SagaInfo
from sagakit.journal import TERMINAL, Entry, Kind, SagaState
from sagakit.middleware import Middleware
from sagakit.store import open_store
from sagakit.store.base import CANCEL_SIGNAL, SagaRecord, new_saga
from sagakit.worker import Outcome, Runner, RunnerSettings

RESTING = TERMINAL | {SagaState.NEEDS_ATTENTION}

log = logging.getLogger("sagakit")


class App:
    """A sagakit application: where sagas are stored, which definitions exist, who runs them.

    Args:
        url: ``sqlite:///path.db`` (default ``sqlite:///sagakit.db``), a file path, or
            ``postgresql://user@host/db[?schema=name]`` for many workers on one database.
        durability: ``"full"`` fsyncs every commit (default); ``"normal"`` survives a crash of
            the process but not of the machine.
        worker: True to execute sagas in this process (the database's worker lock is taken;
            :class:`DatabaseOwned` if another process holds it), False to only start and read
            them, None (default) to execute them if no other process does.
        max_concurrency: sagas executed at once by this process.
        poll_interval: seconds between looks for sagas to claim (started by other processes,
            or left by workers that died), besides the wake-ups the database sends.
        max_recoveries: a saga taken over from dead workers more often than this is parked
            in ``needs_attention`` instead of being run again.
        thread_pool_size: threads for synchronous step functions.
        pool_size: PostgreSQL only: connections in the pool.
        lease: PostgreSQL only: seconds a worker keeps its sagas without a heartbeat; after
            that (or at once, if its database connection is gone) others take them over.
        middleware: wrappers around every step and compensation call, the first outermost
            (see :mod:`sagakit.middleware`).
        clock: where sagas read the time and wait; a :class:`~sagakit.clock.VirtualClock`
            lets tests skip time (SQLite only).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        durability: str = "full",
        worker: bool | None = None,
        max_concurrency: int = 1000,
        poll_interval: float = 1.0,
        max_recoveries: int = 5,
        thread_pool_size: int = 32,
        pool_size: int = 10,
        lease: float = 10.0,
        middleware: builtins.list[Middleware] | tuple[Middleware, ...] = (),
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.store = open_store(
            url, durability=durability, pool_size=pool_size, lease=lease, clock=clock
        )
        self.clock = clock
        self.middleware = tuple(middleware)
        for m in self.middleware:
            if not isinstance(m, Middleware):
                raise ConfigurationError(
                    f"middleware must subclass sagakit.middleware.Middleware, got {m!r}"
                )
        self._want_worker = worker
        self._settings = RunnerSettings(
            max_concurrency=max_concurrency,
            poll_interval=poll_interval,
            max_recoveries=max_recoveries,
        )
        self._thread_pool_size = thread_pool_size
        self._sagas: dict[str, dict[int, Saga]] = {}
        self._runner: Runner | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._opened = False
        self._open_lock: asyncio.Lock | None = None

    # -- definitions -------------------------------------------------------------------------

    def register(self, saga: Saga) -> Saga:
        """Register a definition; new sagas of its type use the highest registered version."""
        if not isinstance(saga, Saga):
            raise ConfigurationError(f"register() takes a sagakit.Saga, got {saga!r}")
        versions = self._sagas.setdefault(saga.name, {})
        if saga.version in versions:
            raise DuplicateSagaType(saga.name, saga.version)
        versions[saga.version] = saga
        return saga

    def saga(
        self, name: str, *, version: int = 1, deadline: float | None = None
    ) -> Callable[[Workflow], Workflow]:
        """Register a code-first workflow: ``@app.saga("Name") async def fn(ctx, data): ...``."""

        def decorate(fn: Workflow) -> Workflow:
            self.register(Saga(name, workflow=fn, version=version, deadline=deadline))
            return fn

        return decorate

    def definition(self, saga_type: str, version: int | None = None) -> Saga | None:
        versions = self._sagas.get(saga_type)
        if not versions:
            return None
        return versions.get(version if version is not None else max(versions))

    def _caps(self) -> dict[str, tuple[int | None, int | None]]:
        latest = (self.definition(t) for t in self._sagas)
        return {
            s.name: (s.max_in_flight, s.max_in_flight_per_worker)
            for s in latest
            if s is not None and s.capped
        }

    @property
    def saga_types(self) -> list[str]:
        return sorted(self._sagas)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def executing(self) -> bool:
        """Whether this process executes the database's sagas."""
        return self._runner is not None

    async def open(self) -> None:
        """Open the database (creating or migrating it) and, if this process executes sagas,
        resume every unfinished one. Called by the first operation if you do not."""
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._opened:
                return
            await self.store.open()
            if self._want_worker is not False:
                await self._become_worker()
            self._opened = True
        if self._runner is not None:
            await self._runner.recover()
            self._runner.start_polling()

    async def _become_worker(self) -> None:
        executor = ThreadPoolExecutor(self._thread_pool_size, thread_name_prefix="sagakit-step")
        runner = Runner(
            self.store,
            self.definition,
            self._settings,
            executor,
            self._caps,
            clock=self.clock,
            middleware=self.middleware,
        )
        try:
            await self.store.start_worker(runner.wake)
        except DatabaseOwned:
            executor.shutdown(wait=False)
            if self._want_worker:
                await self.store.close()
                raise
            log.info("another process executes %s; this App only starts and reads",
                     self.store.location)  # fmt: skip
            return
        self._executor, self._runner = executor, runner

    async def close(self) -> None:
        """Stop executing (running sagas resume from their journal next time) and close."""
        if not self._opened:
            return
        if self._runner is not None:
            await self._runner.stop()
            self._runner = None
            await self.store.stop_worker()
        await self.store.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._opened = False

    async def __aenter__(self) -> App:
        await self.open()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open_for_reading(self) -> None:
        """Open the database without executing sagas (for tools that only read)."""
        if not self._opened:
            self._want_worker = False
            await self.open()

    async def _ready(self) -> None:
        if not self._opened:
            await self.open()

    # -- operations --------------------------------------------------------------------------

    async def start(
        self,
        saga_type: str,
        data: Any = None,
        *,
        idempotency_key: str | None = None,
        deadline: float | None = None,
    ) -> SagaHandle:
        """Start a saga and return its handle once the start is durable.

        A second start with the same ``idempotency_key`` returns the first saga's handle
        (``handle.created`` is False) and starts nothing. ``deadline`` (seconds from now)
        overrides the definition's.

        Raises:
            UnknownSagaType: no definition of ``saga_type`` is registered.
            NotSerializable: ``data`` cannot be stored as JSON. Nothing is written.
        """
        saga = self.definition(saga_type)
        if saga is None:
            raise UnknownSagaType(saga_type, self.saga_types)
        if idempotency_key is not None and not isinstance(idempotency_key, str):
            raise ConfigurationError(
                f"idempotency_key must be a str, got {type(idempotency_key).__name__}"
            )
        payload = encode(data, what=f"the input of saga {saga_type!r}")
        if saga.input_type is not None:
            try:
                decode(payload, saga.input_type)
            except PayloadError as exc:
                raise InvalidInput(saga_type, saga.input_type, str(exc.__cause__ or exc)) from exc
        await self._ready()
        record, first = new_saga(
            saga,
            payload,
            now=self.clock.now(),
            idempotency_key=idempotency_key,
            deadline=deadline,
            # A capped type starts through a claim, which counts it against its cap.
            owner=self.store.worker_id if self._runner is not None and not saga.capped else None,
        )
        stored, created = await self.store.create(record, first)
        if created and self._runner is not None:
            if saga.capped:
                self._runner.wake()
            else:
                self._runner.launch(stored, [first])
        return SagaHandle(self, stored.id, created=created)

    def handle(self, saga_id: str) -> SagaHandle:
        return SagaHandle(self, saga_id)

    async def _record(self, saga_id: str) -> SagaRecord:
        await self._ready()
        record = await self.store.get(saga_id)
        if record is None:
            raise SagaNotFound(saga_id)
        return record

    async def get(self, saga_id: str) -> SagaInfo:
        """The saga's current state. Raises :class:`SagaNotFound` for an unknown id."""
        return SagaInfo.of(await self._record(saga_id))

    async def list(
        self,
        *,
        state: SagaState | str | None = None,
        saga_type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> builtins.list[SagaInfo]:
        """Sagas, newest first, filtered by state and type."""
        if state is not None:
            try:
                state = SagaState(state)
            except ValueError:
                known = ", ".join(s.value for s in SagaState)
                raise ConfigurationError(f"unknown state {state!r}; use one of {known}") from None
        await self._ready()
        records = await self.store.list_sagas(state=state, saga_type=saga_type, limit=limit,
                                        offset=offset)  # fmt: skip
        return [SagaInfo.of(r) for r in records]

    async def journal(self, saga_id: str) -> builtins.list[Entry]:
        """The saga's journal entries, oldest first."""
        await self._record(saga_id)
        return await self.store.journal(saga_id)

    async def outcome(self, saga_id: str, poll: float = 0.05) -> Outcome:
        """Wait until the saga is completed, failed, cancelled or needs attention."""
        while True:
            task = self._runner.tasks.get(saga_id) if self._runner else None
            if task is not None:
                try:
                    local = await asyncio.shield(task)
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # the waiter itself was cancelled
                    raise AppClosed(saga_id) from None
                if local is not None and local.state in RESTING:
                    return local
            record = await self._record(saga_id)
            if record.state in RESTING:
                return Outcome(state=record.state, output=record.output, error=record.error)
            if task is None:
                await asyncio.sleep(poll)

    async def wait(self, saga_id: str) -> SagaInfo:
        """Wait until the saga is completed, failed, cancelled or needs attention."""
        await self.outcome(saga_id)
        return await self.get(saga_id)

    async def retry(self, saga_id: str) -> SagaHandle:
        """Resume a saga in ``needs_attention``: its owed compensations, or its workflow if it
        was parked before compensating (after a fix was deployed)."""

        def decide(record: SagaRecord, journal: builtins.list[Entry]) -> builtins.list[Entry]:
            _require_attention(record, "retry")
            compensating = any(e.kind is Kind.SAGA_COMPENSATING for e in journal)
            resume = SagaState.COMPENSATING if compensating else SagaState.RUNNING
            return [_operator_entry(journal, Kind.OPERATOR_RETRY, {"resume": resume.value})]

        await self._ready()
        await self.store.append_checked(saga_id, decide)
        if self._runner is not None:
            self._runner.wake()  # it claims the saga, which the retry released
        return SagaHandle(self, saga_id)

    async def resolve(self, saga_id: str, note: str) -> SagaInfo:
        """Record that an operator settled a ``needs_attention`` saga by hand; it ends failed
        with the note in its journal."""
        if not isinstance(note, str) or not note.strip():
            raise ConfigurationError(
                "resolve() needs a note (a non-empty str) saying what was done"
            )

        def decide(record: SagaRecord, journal: builtins.list[Entry]) -> builtins.list[Entry]:
            _require_attention(record, "resolve")
            return [_operator_entry(journal, Kind.OPERATOR_RESOLVED, {"note": note})]

        await self._ready()
        return SagaInfo.of(await self.store.append_checked(saga_id, decide))

    async def signal(
        self, saga_id: str, name: str, payload: Any = None, *, signal_id: str | None = None
    ) -> bool:
        """Send signal ``name`` with ``payload`` to a saga. It is stored first, then delivered
        to the saga's ``ctx.wait_for_signal(name)`` (now, or whenever it waits for it); each
        signal is delivered once. Return False if a signal with ``signal_id`` was already
        sent to this saga (nothing is stored again).

        Raises:
            SagaNotFound: no saga has this id.
            InvalidSagaState: the saga is completed, failed or cancelled.
            NotSerializable: ``payload`` cannot be stored as JSON. Nothing is written.
        """
        if not isinstance(name, str) or not name or name.startswith("sagakit."):
            raise ConfigurationError(
                f"a signal name is a non-empty str not starting with 'sagakit.', got {name!r}"
            )
        if signal_id is not None and (not isinstance(signal_id, str) or not signal_id):
            raise ConfigurationError(f"signal_id must be a non-empty str, got {signal_id!r}")
        encoded = encode(payload, what=f"the payload of signal {name!r}")
        await self._ready()
        sent = await self.store.send_signal(
            saga_id, signal_id or str(uuid.uuid4()), name, encoded, self.clock.now()
        )
        if sent and self._runner is not None:
            self._runner.wake()
        return sent

    async def cancel(self, saga_id: str, *, reason: str = "") -> None:
        """Cancel a saga: at its next step or wait it stops going forward, compensates every
        step it completed (a step running now finishes first, and is compensated too) and
        ends ``cancelled``. A saga parked in ``needs_attention`` before compensating is
        cancelled the same way. Cancelling twice is harmless; a saga past its pivot step
        cannot be cancelled.

        Raises:
            SagaNotFound: no saga has this id.
            InvalidSagaState: the saga has ended, is compensating already, or is past its
                pivot. Nothing is written.
        """
        if not isinstance(reason, str):
            raise ConfigurationError(f"reason must be a str, got {reason!r}")
        await self._ready()
        record = await self._record(saga_id)
        journal = await self.store.journal(saga_id)
        _check_cancellable(record, journal)
        if record.state is SagaState.NEEDS_ATTENTION:

            def decide(r: SagaRecord, j: builtins.list[Entry]) -> builtins.list[Entry]:
                _check_cancellable(r, j)
                data = {"reason": reason, "resume": SagaState.RUNNING.value}
                return [_operator_entry(j, Kind.CANCEL_REQUESTED, data)]

            await self.store.append_checked(saga_id, decide)
        else:
            payload = encode({"reason": reason})
            await self.store.send_signal(
                saga_id, CANCEL_SIGNAL, CANCEL_SIGNAL, payload, self.clock.now()
            )
        if self._runner is not None:
            self._runner.cancel(saga_id, reason)
            self._runner.wake()

    async def run_worker(self, stop: asyncio.Event) -> None:
        """Execute and recover this database's sagas until ``stop`` is set, then shut down:
        commits in flight finish, unfinished sagas resume from their journal next time."""
        self._want_worker = True
        await self.open()
        await stop.wait()
        await self.close()


def _check_cancellable(record: SagaRecord, journal: list[Entry]) -> None:
    kinds = {e.kind for e in journal}
    if record.state in TERMINAL or Kind.SAGA_COMPENSATING in kinds:
        raise InvalidSagaState(record.id, record.state, "cancel", "started, running, or "
                               "needs_attention before compensating")  # fmt: skip
    pivot = _pivot_passed(journal)
    if pivot is not None:
        raise InvalidSagaState(record.id, f"past its pivot step {pivot!r}", "cancel",
                               "before its pivot")  # fmt: skip


def _pivot_passed(journal: list[Entry]) -> str | None:
    """The pivot or retriable step a saga completed or started, from its journal."""
    for e in journal:
        kind = (e.data or {}).get("kind")
        if (e.kind is Kind.STEP_COMPLETED and kind == "pivot") or (
            e.kind is Kind.STEP_STARTED and kind == "retriable"
        ):
            return e.step
    return None


def _require_attention(record: SagaRecord, action: str) -> None:
    if record.state is not SagaState.NEEDS_ATTENTION:
        raise InvalidSagaState(record.id, record.state, action, "needs_attention")


def _operator_entry(journal: list[Entry], kind: Kind, data: dict[str, Any]) -> Entry:
    saga_id = journal[0].saga_id
    index = journal[-1].index + 1
    return Entry(saga_id=saga_id, index=index, kind=kind, at=time.time(), data=data)
