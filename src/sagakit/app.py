"""App: configuration, the registry of saga definitions, and start/get/list/retry/resolve."""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from sagakit.clock import SYSTEM_CLOCK, Clock
from sagakit.codec import decode, encode, text_problem
from sagakit.definition import Saga, Workflow, deadline_problem
from sagakit.errors import (
    AppClosed,
    ConfigurationError,
    DatabaseOwned,
    DuplicateSagaType,
    InvalidInput,
    PayloadError,
    SagaNotFound,
    UnknownSagaType,
)
from sagakit.handle import SagaHandle, SagaInfo
from sagakit.journal import TERMINAL, Entry, SagaState
from sagakit.messaging import Broker, open_broker
from sagakit.messaging.outbox import OutboxRelay
from sagakit.messaging.replies import GROUP as REPLY_GROUP
from sagakit.messaging.replies import ReplyConsumer
from sagakit.middleware import Middleware
from sagakit.operations import Operations, check_text
from sagakit.remote import DEFAULT_REPLY_TOPIC
from sagakit.store import open_store
from sagakit.store.base import SagaRecord, new_saga
from sagakit.worker import Outcome, Runner, RunnerSettings

RESTING = TERMINAL | {SagaState.NEEDS_ATTENTION}

log = logging.getLogger("sagakit")


class App(Operations):
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
        broker: the message broker of remote steps (``amqp://...``, ``nats://...``,
            ``redis://...``, ``memory://name``, or a Broker). A worker App relays the
            outbox's commands to it and consumes the replies on ``reply_topic``.
        reply_topic: where services send the replies to this App's commands; every App of
            one database should use the same.
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
        broker: str | Broker | None = None,
        reply_topic: str = DEFAULT_REPLY_TOPIC,
    ) -> None:
        self.store = open_store(
            url, durability=durability, pool_size=pool_size, lease=lease, clock=clock
        )
        self.clock = clock
        self.broker = open_broker(broker) if isinstance(broker, str) else broker
        self.reply_topic = reply_topic
        self._relay: OutboxRelay | None = None
        self._replies: ReplyConsumer | None = None
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
            if self._relay is not None and self._replies is not None and self.broker is not None:
                # Replies to the first commands must find the reply queue there.
                await self.broker.declare(self.reply_topic, REPLY_GROUP)
                self._relay.start()
                self._replies.start()
            await self._runner.recover()
            self._runner.start_polling()

    async def _become_worker(self) -> None:
        executor = ThreadPoolExecutor(self._thread_pool_size, thread_name_prefix="sagakit-step")
        relay = None if self.broker is None else OutboxRelay(self.store, self.broker)
        runner = Runner(
            self.store,
            self.definition,
            self._settings,
            executor,
            self._caps,
            clock=self.clock,
            middleware=self.middleware,
            reply_topic=self.reply_topic,
            on_command=None if relay is None else relay.wake,
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
        if self.broker is not None and relay is not None:
            await self.broker.connect()
            self._relay = relay
            self._replies = ReplyConsumer(
                self.store, self.broker, self.reply_topic, on_reply=runner.wake
            )

    async def close(self) -> None:
        """Stop executing (running sagas resume from their journal next time) and close."""
        if not self._opened:
            return
        if self._runner is not None:
            await self._runner.stop()
            self._runner = None
            await self._stop_messaging()
            await self.store.stop_worker()
        await self.store.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._opened = False

    async def _stop_messaging(self) -> None:
        for part in (self._replies, self._relay):
            if part is not None:
                await part.stop()
        self._relay = self._replies = None
        if self.broker is not None:
            await self.broker.close()

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
        if idempotency_key is not None:
            check_text(idempotency_key, "idempotency_key")
        if deadline is not None and (problem := deadline_problem(deadline)):
            raise ConfigurationError(f"{problem}; nothing was written")
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
        if not isinstance(saga_id, str) or text_problem(saga_id):
            raise SagaNotFound(str(saga_id))  # no stored saga can have such an id
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
        if saga_type is not None and text_problem(saga_type):
            return []  # no saga type has such a name
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

    async def run_worker(self, stop: asyncio.Event) -> None:
        """Execute and recover this database's sagas until ``stop`` is set, then shut down:
        commits in flight finish, unfinished sagas resume from their journal next time."""
        self._want_worker = True
        await self.open()
        await stop.wait()
        await self.close()
