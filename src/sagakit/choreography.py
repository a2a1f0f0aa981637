"""Choreography: services that react to each other's events, with no orchestrator.

::

    bus = EventBus("amqp://guest:guest@127.0.0.1/", service="inventory",
                   inbox="postgresql://127.0.0.1/shop?schema=inventory")

    @bus.on("OrderCreated")
    async def reserve(event: EventContext, order: dict) -> None:
        await event.db.execute("INSERT INTO reservations (order_id) VALUES ($1)", order["id"])
        event.publish("InventoryReserved", {"order_id": order["id"]})

    async with bus:                        # handle events in the background meanwhile
        first = await bus.publish("OrderCreated", order)   # a new flow: a new correlation id

An event's type is its topic. Every service subscribes with its own consumer group (its name),
so each service gets every event it handles, and the processes of one service share them.
The **correlation id** names the flow (the choreographed saga) an event belongs to: events a
handler publishes through ``event.publish`` carry the incoming event's correlation id and name
it as their cause (``causation_id``), so a :class:`~sagakit.tracker.Tracker` can follow the
flow across services.

Each event is handled once per service, however often the broker delivers it, through the
service's :class:`~sagakit.inbox.Inbox`: the handler runs in the inbox's transaction (its
writes to ``event.db`` commit with the inbox row, or not at all), and the events it publishes
are stored in that row and sent after commit. A delivery of an event whose handling committed
(a redelivery after a crash, a duplicate) sends exactly those events again, with the same
message ids, for their receivers' inboxes to drop; the handler does not run again.

A handler that raises is rolled back (its writes and its events) and the event is delivered
again after ``retry_delay``; after ``max_attempts`` failures in a row in this process the event
is recorded as handled with the error (logged; nothing is published), at once if its payload
does not fit the handler's ``input_type`` or the handler publishes data that is not JSON. A
handler that meets a business failure should say so with an event (``PaymentFailed``) instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sagakit.calls import is_async
from sagakit.codec import convert, decode, error_info
from sagakit.consumer import TopicConsumer
from sagakit.errors import BrokerUnavailable, ConfigurationError, PayloadError
from sagakit.events import (
    SERVICE_HEADER,
    EventContext,
    check_event_type,
    inbox_record,
    recorded_events,
)
from sagakit.inbox import Inbox, InboxTx
from sagakit.messaging import Broker, Envelope, open_broker

__all__ = ["EventBus", "EventContext"]

log = logging.getLogger("sagakit.choreography")
F = TypeVar("F", bound=Callable[..., Any])
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_MAX_BACKOFF = 5.0


@dataclass(frozen=True, slots=True)
class _Handler:
    fn: Callable[..., Any]
    input_type: Any


class EventBus:
    """Handles and publishes the events of one service; see the module docstring.

    Args:
        broker: a :class:`~sagakit.messaging.Broker` (connected and closed by its owner) or a
            broker URL (the bus connects and closes it).
        service: the service's name: its consumer group, and the ``service`` header of the
            events it publishes.
        inbox: an :class:`~sagakit.inbox.Inbox` (opened by the bus, closed by its owner) or
            its database URL; default ``sqlite:///<service>-inbox.db``.
        concurrency: how many events are handled at once at most.
        retry_delay: seconds before an event whose handling failed is given back.
        max_attempts: failed handlings of one event (in this process) before it is recorded
            as handled with its error and dropped.
    """

    def __init__(
        self,
        broker: Broker | str,
        *,
        service: str,
        inbox: str | Inbox | None = None,
        concurrency: int = 16,
        retry_delay: float = 1.0,
        max_attempts: int = 5,
    ) -> None:
        if not isinstance(service, str) or not _NAME.match(service):
            raise ConfigurationError(
                f"a service name is letters, digits, '_' and '-', got {service!r}"
            )
        if max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be at least 1, got {max_attempts}")
        self.service = service
        self.concurrency = concurrency
        self.retry_delay = retry_delay
        self.max_attempts = max_attempts
        self._owns_broker = isinstance(broker, str)
        self.broker: Broker = open_broker(broker) if isinstance(broker, str) else broker
        self._owns_inbox = not isinstance(inbox, Inbox)
        self.inbox = (
            inbox
            if isinstance(inbox, Inbox)
            else Inbox(inbox or f"sqlite:///{service}-inbox.db", pool_size=concurrency)
        )
        self._handlers: dict[str, _Handler] = {}
        self._attempts: dict[str, int] = {}  # message id -> failed handlings here
        self._consumer: TopicConsumer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._started = False
        self._closed = asyncio.Event()

    def on(self, event_type: str, *, input_type: Any = None) -> Callable[[F], F]:
        """Register the decorated function as this service's handler of ``event_type``.

        The handler is ``async def handler(event: EventContext, data) -> None`` (a plain
        function runs in a thread pool); ``data`` is the event's payload, rebuilt as
        ``input_type`` (a dataclass or pydantic model) if given.
        """
        check_event_type(event_type)
        if event_type in self._handlers:
            raise ConfigurationError(f"{self.service} already handles {event_type!r}")
        if self._started:
            raise ConfigurationError(f"register {event_type!r} before the bus starts")

        def register(fn: F) -> F:
            self._handlers[event_type] = _Handler(fn, input_type)
            return fn

        return register

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect an owned broker and, if there are handlers, open the inbox and consume in
        the background (subscribed once this returns)."""
        if self._started:
            return
        self._started = True
        if self._owns_broker:
            await self.broker.connect()
        if not self._handlers:
            return  # a bus that only publishes
        await self.inbox.open()
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix=self.service)
        self._consumer = TopicConsumer(
            self.broker,
            self.service,
            self._handlers,
            self._handle,
            name=f"sagakit-bus-{self.service}",
            concurrency=self.concurrency,
            retry_delay=self.retry_delay,
        )
        await self._consumer.start()
        log.info("%s handles %s", self.service, ", ".join(self._handlers))

    async def run(self) -> None:
        """Handle events until :meth:`close` is called, or until cancelled (then close)."""
        await self.start()
        try:
            await self._closed.wait()
        except asyncio.CancelledError:
            await asyncio.shield(self.close())
            raise

    async def close(self, *, grace: float = 10.0) -> None:
        """Stop taking events, let those in hand finish for up to ``grace`` seconds (then
        cancel them: they are delivered again), and close what the bus owns."""
        if self._closed.is_set():
            return
        try:
            if self._consumer is not None:
                await self._consumer.close(grace=grace)
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            if self._started and self._handlers and self._owns_inbox:
                await self.inbox.close()
            if self._started and self._owns_broker:
                await self.broker.close()
        finally:
            self._closed.set()

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- publishing --------------------------------------------------------------------------

    async def publish(
        self,
        event_type: str,
        data: Any = None,
        *,
        correlation_id: str | None = None,
        causation: Envelope | EventContext | None = None,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
    ) -> Envelope:
        """Publish an event now and return it once the broker has it.

        Its correlation id is ``correlation_id``, else that of ``causation`` (the event that
        caused it, which it names as its cause); with neither, the event starts a new flow
        under a new correlation id (read it from the returned envelope). Inside a handler,
        prefer ``event.publish``, which sends only if the handling commits.

        Raises:
            NotSerializable: ``data`` cannot be sent as JSON. Nothing is sent.
            BrokerUnavailable: the broker cannot be reached; publish again.
        """
        check_event_type(event_type)
        cause = causation.envelope if isinstance(causation, EventContext) else causation
        if correlation_id is None:
            correlation_id = cause.correlation_id if cause is not None else str(uuid.uuid4())
        envelope = Envelope.new(
            event_type,
            data,
            correlation_id=correlation_id,
            causation_id=None if cause is None else cause.message_id,
            message_id=message_id,
            headers={**(headers or {}), SERVICE_HEADER: self.service},
            traceparent=None if cause is None else cause.traceparent,
            tracestate=None if cause is None else cause.tracestate,
        )
        if self._owns_broker:
            await self.broker.connect()  # does nothing once connected
        await self.broker.publish(event_type, envelope)
        return envelope

    # -- handling ----------------------------------------------------------------------------

    async def _handle(self, topic: str, event: Envelope) -> None:
        """Handle one delivery: run the handler once, then send the events it published."""
        try:
            data = decode(event.payload)
        except PayloadError as exc:
            log.error("%s drops event %s of flow %s (message %s): %s", self.service, event.type,
                      event.correlation_id, event.message_id, exc)  # fmt: skip
            return
        stored = await self.inbox.seen(event.message_id)
        if stored is None:
            stored = await self._handle_once(self._handlers[topic], event, data)
        else:
            log.info("%s: %s (message %s) was handled before; its events are sent again",
                     self.service, event.type, event.message_id)  # fmt: skip
        await self._send(event, stored)

    async def _handle_once(self, handler: _Handler, event: Envelope, data: Any) -> str:
        """Run the handler in an inbox transaction; the JSON stored with the inbox row."""
        async with self.inbox.transaction() as tx:
            claimed = await tx.claim(event.message_id)
            if claimed:
                stored = await self._outcome(tx, handler, event, data)
                await tx.record(event.message_id, stored)
        self._attempts.pop(event.message_id, None)
        if not claimed:  # a concurrent duplicate handled it and committed meanwhile
            return await self.inbox.seen(event.message_id) or ""
        return stored

    async def _outcome(self, tx: InboxTx, handler: _Handler, event: Envelope, data: Any) -> str:
        """Run the handler; what to store for the event. Raises to have it delivered again."""
        attempt = self._attempts.get(event.message_id, 0) + 1
        ctx = EventContext(
            service=self.service,
            event=event.type,
            message_id=event.message_id,
            saga_id=event.correlation_id,
            causation_id=event.causation_id,
            headers=dict(event.headers),
            db=tx.db,
            envelope=event,
        )
        try:
            arg = data if handler.input_type is None else convert(data, handler.input_type)
        except Exception as exc:  # it will not fit any better next time
            return self._give_up(event, attempt, exc)
        try:
            async with tx.savepoint():
                await self._call(handler.fn, ctx, arg)
            return inbox_record(ctx.published)
        except Exception as exc:
            # An event that cannot be sent (NotSerializable) fails the same way every time.
            if attempt < self.max_attempts and not isinstance(exc, PayloadError):
                self._attempts[event.message_id] = attempt
                raise  # the whole transaction rolls back; the event comes again
            return self._give_up(event, attempt, exc)

    def _give_up(self, event: Envelope, attempt: int, exc: Exception) -> str:
        log.error("%s gives up on %s of flow %s (message %s) after %d attempt(s): %s: %s; it "
                  "is recorded as handled and nothing is published", self.service, event.type,
                  event.correlation_id, event.message_id, attempt, type(exc).__name__,
                  exc)  # fmt: skip
        return inbox_record([], error=error_info(exc))

    async def _call(self, fn: Callable[..., Any], ctx: EventContext, arg: Any) -> Any:
        if is_async(fn):
            return await fn(ctx, arg)
        loop = asyncio.get_running_loop()
        work: Awaitable[Any] = loop.run_in_executor(self._executor, functools.partial(fn, ctx, arg))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # A thread cannot be stopped: let it finish with ctx.db before the transaction
            # it writes in is rolled back.
            await asyncio.wait([asyncio.ensure_future(work)])
            raise

    async def _send(self, event: Envelope, stored: str) -> None:
        """Publish the events stored for ``event``, in order, retrying with backoff while the
        broker is unreachable (until the bus closes: then the event is delivered again)."""
        for message in recorded_events(event, stored):
            delay = 0.05
            while True:
                try:
                    await self.broker.publish(message.type, message)
                    break
                except BrokerUnavailable as exc:
                    if self._consumer is None or self._consumer.closing:
                        raise
                    log.warning("%s cannot publish %s (%s); retrying", self.service,
                                message.type, exc.reason)  # fmt: skip
                    await self._consumer.pause(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, _MAX_BACKOFF)
