"""The tracker: a choreographed saga's events, correlated into one journal, watched for stalls.

::

    tracker = Tracker(
        "postgresql://127.0.0.1/shop", "amqp://guest:guest@127.0.0.1/",
        saga_type="OrderChoreography",
        starts="OrderCreated",
        steps=["ReserveInventory", "InventoryReserved", "ProcessPayment", "PaymentProcessed"],
        completes=["OrderFulfilled"],
        fails=["PaymentFailed"],
        compensations={"InventoryReserved": "InventoryReleased"},
        deadline=30.0,
    )
    async with tracker: ...   # or: await tracker.run()

The tracker subscribes to every event of the flow in the consumer group
``sagakit-tracker-<saga_type>`` and records each event that has a correlation id in the saga
that id names, in sagakit's database: ``sagakit list --type OrderChoreography`` and
``sagakit show <correlation id>`` show these sagas like any other. The rules that move a
tracked saga between states are in :mod:`sagakit.tracker_flow`. Every ``check_interval``
seconds it parks the sagas that made no progress for ``deadline`` seconds in
``needs_attention``; a tracker that has just started waits one ``deadline`` before its first
check, so that the events queued while it was away are recorded first.

**Ids.** A correlation id that is a plain id (letters, digits and ``._:@-``, at most 200
characters) is the saga's id; another gets a stable id derived from it. Either way the
correlation id is the saga's idempotency key, so two trackers of one flow make one saga. An
event whose correlation id names a saga of another type is logged and skipped.

**Engine.** Tracked sagas have no definition and must never be run by a worker. They are
created with ``wake_at`` far in the future, so no claim takes them, and the tracker writes
their entries with ``append`` as a client of the database (not as a worker, so the write is not
fenced and leaves ``owner`` and ``wake_at`` alone). That is why it takes the database URL
rather than an App that may execute sagas. Concurrent writers (several tracker processes)
are serialised by the journal's primary key: a write that lost the race to an index fails,
and is decided again on the journal as it now is. Once a saga has completed or failed its
``wake_at`` is cleared (no claim takes an ended saga, and ``sagakit list`` stops calling it
waiting).

**Operators.** ``sagakit resolve`` settles a parked tracked saga by hand (it ends failed).
``retry``, ``cancel`` and ``signal`` do not apply to tracked sagas: they make a saga claimable,
and a worker would park it again as a type it does not know.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence

from sagakit.codec import decode
from sagakit.consumer import TopicConsumer
from sagakit.errors import ConfigurationError, PayloadError, StoreError, StoreUnavailable
from sagakit.events import SERVICE_HEADER
from sagakit.journal import ACTIVE, Entry, Kind, SagaState
from sagakit.messaging import Broker, Envelope, open_broker
from sagakit.store import open_store
from sagakit.store.base import WAIT_FOREVER, SagaRecord, Store
from sagakit.tracker_flow import Flow

__all__ = ["Tracker"]

log = logging.getLogger("sagakit.tracker")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@\-]{0,199}$")
_NAMESPACE = uuid.UUID("c4b0b3a2-5d0e-4f7b-8a51-7e0f2d9c6b13")
_WRITE_TRIES = 8
_PAGE = 500
_LOCKS = 64
_ENDS = frozenset({Kind.SAGA_COMPLETED, Kind.SAGA_FAILED})


class Tracker:
    """Records the events of one choreographed flow as sagas; see the module docstring.

    Args:
        db: sagakit's database URL (the App's): ``sqlite:///path.db`` or
            ``postgresql://user@host/db[?schema=name]``.
        broker: a :class:`~sagakit.messaging.Broker` (connected and closed by its owner) or
            a broker URL (the tracker connects and closes it).
        saga_type: the type the tracked sagas are listed under.
        starts: the event that starts a flow.
        completes: the events that complete it.
        steps: the events between, in flow order (they say what a stalled flow waits for).
        fails: the events that make it fail.
        compensations: forward event (``starts`` or a step) -> the event that reports it
            undone; a failed flow is compensated once each one owed has been seen.
        events: other events to record in the journal, with no effect on the state.
        deadline: seconds without a new event after which an unfinished flow is parked in
            ``needs_attention``.
        check_interval: seconds between looks for stalled flows (default: a fifth of the
            deadline, at most 5 s).
        concurrency: events recorded at once at most.
        retry_delay: seconds before an event that could not be recorded is given back.
    """

    def __init__(
        self,
        db: str,
        broker: Broker | str,
        *,
        saga_type: str,
        starts: str,
        completes: Iterable[str],
        steps: Sequence[str] = (),
        fails: Iterable[str] = (),
        compensations: Mapping[str, str] | None = None,
        events: Iterable[str] = (),
        deadline: float,
        check_interval: float | None = None,
        concurrency: int = 16,
        retry_delay: float = 1.0,
    ) -> None:
        if not isinstance(db, str):
            raise ConfigurationError(
                f"Tracker takes sagakit's database URL (it writes as a client, never as a "
                f"worker), got {type(db).__name__}"
            )
        if not deadline > 0:
            raise ConfigurationError(f"deadline must be > 0 seconds, got {deadline!r}")
        self.flow = Flow.of(saga_type, starts=starts, completes=completes, steps=steps,
                            fails=fails, compensations=compensations, events=events)  # fmt: skip
        self.saga_type = saga_type
        self.deadline = float(deadline)
        self.check_interval = check_interval or min(self.deadline / 5, 5.0)
        self.group = "sagakit-tracker-" + re.sub(r"[^A-Za-z0-9_\-]", "-", saga_type)
        self.store: Store = open_store(db)
        self._owns_broker = isinstance(broker, str)
        self.broker: Broker = open_broker(broker) if isinstance(broker, str) else broker
        self._consumer = TopicConsumer(
            self.broker, self.group, self.flow.topics, self._on_event,
            name=self.group, concurrency=concurrency, retry_delay=retry_delay,
        )  # fmt: skip
        # Writes to one saga queue here, so that this process's writers do not race each
        # other for journal indexes (other processes may; see _write).
        self._locks = [asyncio.Lock() for _ in range(_LOCKS)]
        self._checker: asyncio.Task[None] | None = None
        self._started = False
        self._closed = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database (and an owned broker), subscribe, and watch for stalls in the
        background."""
        if self._started:
            return
        self._started = True
        await self.store.open()
        if self._owns_broker:
            await self.broker.connect()
        await self._consumer.start()
        self._checker = asyncio.create_task(self._watch(), name=f"{self.group}-stalls")
        log.info("tracking %s: %s", self.saga_type, ", ".join(self.flow.topics))

    async def run(self) -> None:
        """Track until :meth:`close` is called, or until cancelled (then close)."""
        await self.start()
        try:
            await self._closed.wait()
        except asyncio.CancelledError:
            await asyncio.shield(self.close())
            raise

    async def close(self, *, grace: float = 10.0) -> None:
        """Stop: events in hand are recorded for up to ``grace`` seconds (the others are
        delivered again later), then the database and an owned broker are closed."""
        if self._closed.is_set():
            return
        try:
            if self._checker is not None:
                self._checker.cancel()
                await asyncio.gather(self._checker, return_exceptions=True)
            await self._consumer.close(grace=grace)
            if self._started:
                if self._owns_broker:
                    await self.broker.close()
                await self.store.close()
        finally:
            self._closed.set()

    async def __aenter__(self) -> Tracker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- recording events --------------------------------------------------------------------

    def saga_id(self, correlation_id: str) -> str:
        """The id of the saga that the events with ``correlation_id`` are recorded in."""
        if _ID.match(correlation_id):
            return correlation_id
        return str(uuid.uuid5(_NAMESPACE, f"{self.saga_type}/{correlation_id}"))

    async def _on_event(self, topic: str, event: Envelope) -> None:
        await self.record(event)

    async def record(self, event: Envelope) -> str | None:
        """Record ``event`` in its saga (created on first sight) and move the saga's state;
        return the saga's id, or None if the event is not one to record here. Recording an
        event twice (by message id) records it once.

        Raises:
            StoreError: the database failed; the event should be recorded again later.
        """
        tags = {"saga_id": event.correlation_id, "saga_type": self.saga_type, "step": event.type}
        if not event.correlation_id:
            log.warning("%s (message %s) has no correlation id: it belongs to no flow and is "
                        "not recorded", event.type, event.message_id, extra=tags)  # fmt: skip
            return None
        try:
            decode(event.payload)
        except PayloadError as exc:
            log.error("%s (message %s) of flow %s is not recorded: %s", event.type,
                      event.message_id, event.correlation_id, exc, extra=tags)  # fmt: skip
            return None
        record = await self._saga_for(event)
        if record.saga_type != self.saga_type:
            log.warning("%s (message %s) is not recorded: its correlation id %s names saga %s "
                        "of type %s", event.type, event.message_id, event.correlation_id,
                        record.id, record.saga_type, extra=tags)  # fmt: skip
            return None

        def decide(journal: list[Entry]) -> list[Entry]:
            return self.flow.record(event, journal, at=time.time())

        written = await self._write(record.id, decide)
        for e in written:
            if e.kind is not Kind.EVENT_RECORDED:
                log.info("choreographed saga %s: %s after %s", record.id, e.kind.value,
                         event.type, extra=tags)  # fmt: skip
        if written and written[-1].kind in _ENDS:
            # An ended saga waits for nothing (no claim takes it, whatever its wake_at), and
            # `sagakit list` would still call it waiting.
            await self.store.wake(record.id)
        return record.id

    async def _saga_for(self, event: Envelope) -> SagaRecord:
        """The saga the event's correlation id names, created now if there is none."""
        correlation = event.correlation_id or ""
        saga_id = self.saga_id(correlation)
        found = await self.store.get(saga_id)
        if found is not None:
            return found
        now = time.time()
        record = SagaRecord(
            id=saga_id,
            saga_type=self.saga_type,
            version=1,
            state=SagaState.STARTED,
            idempotency_key=correlation,
            input=event.payload,
            output=None,
            error=None,
            current_step=None,
            deadline=None,
            created_at=now,
            updated_at=now,
            wake_at=WAIT_FOREVER,  # never claimable: no worker runs a tracked saga
        )
        data = {
            "version": 1,
            "tracked": True,
            "event": event.type,
            "correlation_id": correlation,
            "service": event.headers.get(SERVICE_HEADER),
        }
        first = Entry(saga_id=saga_id, index=0, kind=Kind.SAGA_STARTED, at=now,
                      payload=event.payload, data=data)  # fmt: skip
        stored, created = await self.store.create(record, first)
        if created:
            log.info("choreographed saga %s started by %s", saga_id, event.type,
                     extra={"saga_id": saga_id, "saga_type": self.saga_type})  # fmt: skip
        return stored

    async def _write(
        self, saga_id: str, decide: Callable[[list[Entry]], list[Entry]]
    ) -> list[Entry]:
        """Append what ``decide`` makes of the saga's journal; return what was appended.

        The append is not fenced (this store is no worker), so the journal's primary key
        (saga, index) is what stops two writers that read the same journal: the second
        fails, and decides again on the journal as it is now.
        """
        async with self._locks[hash(saga_id) % _LOCKS]:
            for attempt in range(1, _WRITE_TRIES + 1):
                entries = decide(await self.store.journal(saga_id))
                if not entries:
                    return []
                try:
                    await self.store.append(saga_id, entries)
                    return entries
                except StoreUnavailable:
                    raise
                except StoreError as exc:
                    if attempt == _WRITE_TRIES:
                        raise
                    log.info("writing to saga %s collided (%s); deciding again", saga_id, exc)
                    await asyncio.sleep(random.uniform(0.005, 0.02) * attempt)
        return []  # unreachable: the loop returns or raises

    # -- stalls ------------------------------------------------------------------------------

    async def check_stalls(self) -> list[str]:
        """Park every tracked saga that made no progress for ``deadline`` seconds; return
        their ids. (The background check calls this every ``check_interval`` seconds.)"""
        cutoff = time.time() - self.deadline
        quiet: list[str] = []
        for state in sorted(ACTIVE):
            offset = 0
            while True:
                page = await self.store.list_sagas(
                    state=state, saga_type=self.saga_type, limit=_PAGE, offset=offset
                )
                quiet += [r.id for r in page if r.updated_at <= cutoff]
                if len(page) < _PAGE:
                    break
                offset += _PAGE
        parked = []
        for saga_id in quiet:

            def decide(journal: list[Entry]) -> list[Entry]:
                return self.flow.stall(journal, now=time.time(), deadline=self.deadline)

            written = await self._write(saga_id, decide)
            if written:
                parked.append(saga_id)
                log.warning("choreographed saga %s needs attention: %s", saga_id,
                            (written[0].error or {}).get("message"),
                            extra={"saga_id": saga_id, "saga_type": self.saga_type})  # fmt: skip
        return parked

    async def _watch(self) -> None:
        await self._consumer.pause(self.deadline)  # let a backlog of events be recorded first
        while not self._consumer.closing:
            try:
                await self.check_stalls()
            except Exception as exc:
                expected = isinstance(exc, StoreError | OSError)
                log.warning("looking for stalled %s sagas failed (%s); trying again",
                            self.saga_type, exc, exc_info=not expected)  # fmt: skip
            await self._consumer.pause(self.check_interval)
