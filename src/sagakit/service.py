"""The service side of remote steps: handlers for the commands sagas send, with automatic replies.

::

    service = Service("InventoryService", broker="amqp://guest:guest@127.0.0.1/",
                      inbox="postgresql://127.0.0.1/shop?schema=inventory")

    @service.handles("ReserveItems")
    async def reserve(ctx: HandlerContext, data: dict) -> dict:
        await ctx.db.execute("INSERT INTO stock_reservations (key, sku) VALUES ($1, $2)",
                             ctx.idempotency_key, data["sku"])
        return {"reserved": True}

    await service.run()          # until service.close(), or cancelled
    async with service: ...      # or: handle commands in the background meanwhile

Each command ``"ReserveItems"`` is consumed from the topic ``"InventoryService.ReserveItems"``
in the consumer group named after the service (its processes share the work; the orchestrator's
outbox declares the same group before its first command, so commands sent before the service
ever ran wait for it), declared before :meth:`Service.start` returns. For every delivery the
service looks the message id up in the inbox (:mod:`sagakit.inbox`): a duplicate gets its
stored reply published again; a new command runs its handler in the inbox transaction, and the
reply is stored with the inbox row before it is published to the command's ``reply_to`` topic
and the delivery acked. The handler's result is replied as ``SagaStepCompleted``; any exception
it raises is a business error, replied as ``SagaStepFailed`` with ``{"type": ..., "message":
...}`` (its writes to ``ctx.db`` are rolled back, the failure is remembered like a success).
Only a failure of the inbox or the broker leaves the delivery unacked, to be delivered again.

The inbox is durable: without ``inbox=`` it is the SQLite file ``<name>-inbox.db`` in the
working directory. Pass the database the handlers write to (sagakit's own, or the service's)
to have their writes commit with the inbox row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sagakit.codec import decode
from sagakit.errors import BrokerUnavailable, ConfigurationError, CorruptMessage, PayloadError
from sagakit.handlers import Handler, HandlerContext, handle, tags
from sagakit.inbox import Inbox
from sagakit.messaging import Broker, Delivery, Envelope, open_broker

__all__ = ["HandlerContext", "Service"]

log = logging.getLogger("sagakit.service")
F = TypeVar("F", bound=Callable[..., Any])
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_MAX_BACKOFF = 5.0


class Service:
    """Handles the commands of one service; see the module docstring.

    Args:
        name: the service's name, the first part of its commands' types.
        broker: a :class:`~sagakit.messaging.Broker` (connected and closed by its owner) or
            a broker URL (the service connects and closes it).
        inbox: the inbox's database URL (default ``sqlite:///<name>-inbox.db``), or an
            :class:`~sagakit.inbox.Inbox` (opened by the service, closed by its owner: an
            :class:`~sagakit.choreography.EventBus` of the same process may share it).
        concurrency: how many commands are handled at once at most.
        tracer_provider: the OpenTelemetry provider of the handlers' spans (default: the
            global one); each handler runs in a span continuing the command's trace.
        retry_delay: seconds to wait before a delivery that could not be handled (the
            inbox's database or the broker failed) is given back to the broker.
    """

    def __init__(
        self,
        name: str,
        *,
        broker: Broker | str,
        inbox: str | Inbox | None = None,
        concurrency: int = 16,
        retry_delay: float = 1.0,
        tracer_provider: Any = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigurationError(
                f"a service name is letters, digits, '_' and '-', got {name!r}"
            )
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
        self.name = name
        self.group = name  # the group the outbox declares: see sagakit.messaging.outbox
        self.tracer_provider = tracer_provider  # None: OpenTelemetry's global provider
        self.concurrency = concurrency
        self.retry_delay = retry_delay
        self._owns_broker = isinstance(broker, str)
        self.broker: Broker = open_broker(broker) if isinstance(broker, str) else broker
        self._owns_inbox = not isinstance(inbox, Inbox)
        # False when the inbox is the default file: the handlers have no database of their own.
        self.inbox_given = inbox is not None
        self.inbox = (
            inbox
            if isinstance(inbox, Inbox)
            else Inbox(inbox or f"sqlite:///{name}-inbox.db", pool_size=concurrency)
        )
        self._handlers: dict[str, Handler] = {}
        self._slots = asyncio.Semaphore(concurrency)
        self._executor: ThreadPoolExecutor | None = None
        self._consumers: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()  # take no more commands
        self._drained = asyncio.Event()  # the commands in hand are done: unsubscribe
        self._closed = asyncio.Event()
        self._started = False

    def handles(self, command: str, *, input_type: Any = None) -> Callable[[F], F]:
        """Register the decorated function as the handler of ``command``.

        The handler is ``async def handler(ctx: HandlerContext, data) -> result`` (a plain
        function runs in a thread pool); ``data`` is the command's payload, rebuilt as
        ``input_type`` (a dataclass or pydantic model) if given. Its result must be
        JSON-serialisable by :mod:`sagakit.codec`.
        """
        if not isinstance(command, str) or not _NAME.match(command):
            raise ConfigurationError(
                f"a command name is letters, digits, '_' and '-' (the service's name is "
                f"added), got {command!r}"
            )
        full = f"{self.name}.{command}"
        if full in self._handlers:
            raise ConfigurationError(f"{full} already has a handler")
        if self._started:
            raise ConfigurationError(f"register {full} before the service starts")

        def register(fn: F) -> F:
            self._handlers[full] = Handler(fn, input_type)
            return fn

        return register

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def handlers(self) -> dict[str, Handler]:
        """The registered handlers by topic (``"InventoryService.ReserveItems"``)."""
        return dict(self._handlers)

    async def start(self) -> None:
        """Open the inbox (and the broker, if given by URL) and consume in the background."""
        if self._started:
            return
        if self._closing.is_set():
            raise ConfigurationError(f"service {self.name} is closed; make a new Service")
        if not self._handlers:
            raise ConfigurationError(f"service {self.name} has no handlers; add @handles(...)")
        await self.inbox.open()
        try:
            if self._owns_broker:
                await self.broker.connect()
            for topic in self._handlers:
                # Commands published from now on are kept for the group, even before the
                # consumer below has subscribed.
                await self.broker.declare(topic, self.group)
        except BaseException:
            await self._release_resources()
            raise
        self._started = True
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix=self.name)
        for topic in self._handlers:
            task = asyncio.create_task(self._consume(topic), name=f"sagakit-{topic}")
            self._consumers.append(task)
        log.info("service %s consumes %s as %s", self.name, ", ".join(self._handlers), self.group)

    async def run(self) -> None:
        """Handle commands until :meth:`close` is called, or until cancelled (then close)."""
        await self.start()
        try:
            await self._closed.wait()
        except asyncio.CancelledError:
            await asyncio.shield(self.close())
            raise

    async def close(self, *, grace: float = 10.0) -> None:
        """Stop taking commands, let those in hand finish for up to ``grace`` seconds (then
        cancel them: they are delivered again), and close the inbox and an owned broker."""
        if self._closing.is_set():
            await self._closed.wait()
            return
        self._closing.set()
        try:
            if self._inflight:
                _, late = await asyncio.wait(set(self._inflight), timeout=grace)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
            self._drained.set()
            for task in self._consumers:
                task.cancel()
            await asyncio.gather(*self._consumers, return_exceptions=True)
            if self._started:
                await self._release_resources()
        finally:
            self._closed.set()

    async def _release_resources(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # its threads are idle: handlers have ended
            self._executor = None
        if self._owns_inbox:
            await self.inbox.close()
        if self._owns_broker:
            await self.broker.close()

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- consuming ---------------------------------------------------------------------------

    async def _consume(self, topic: str) -> None:
        while not self._closing.is_set():
            deliveries: AsyncIterator[Delivery] | None = None
            try:
                deliveries = self.broker.subscribe(topic, self.group)
                if await self._pump(deliveries):
                    if not self._closing.is_set():
                        log.warning("the broker was closed: service %s takes no more %s",
                                    self.name, topic)  # fmt: skip
                    return
            except Exception as exc:
                log.warning("consuming %s failed (%s: %s); subscribing again in %.1fs",
                            topic, type(exc).__name__, exc, self.retry_delay)  # fmt: skip
            finally:
                if deliveries is not None:
                    await _close(deliveries)
            await self._pause(self.retry_delay)

    async def _pump(self, deliveries: AsyncIterator[Delivery]) -> bool:
        """Start a task per delivery, one free slot at a time; True if the broker ended it."""
        it = aiter(deliveries)
        while True:
            await self._slots.acquire()
            try:
                delivery: Delivery = await anext(it)
            except StopAsyncIteration:
                self._slots.release()
                return True
            except BaseException:
                self._slots.release()
                raise
            if self._closing.is_set():
                # Leave it to another consumer, and take no more; the subscription stays open
                # until close() has let the commands in hand be acked on it.
                self._slots.release()
                await _give_back(delivery)
                await self._drained.wait()
                return False
            task = asyncio.create_task(self._process(delivery))
            self._inflight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("service %s: unexpected error", self.name, exc_info=task.exception())

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up as soon as the service is closing."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as the awaited thing completes, and close() relies on cancelling.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    # -- handling one delivery ---------------------------------------------------------------

    async def _process(self, delivery: Delivery) -> None:
        command = delivery.envelope
        fields = tags(command)
        try:
            data = decode(command.payload)
            attempt = int(command.headers.get("attempt", "1"))
        except (PayloadError, ValueError) as exc:
            log.error("dropping corrupt command %s of saga %s (message %s): %s",
                      command.type, command.correlation_id, command.message_id, exc,
                      extra=fields)  # fmt: skip
            await _ack(delivery)
            return
        try:
            stored = await self.inbox.seen(command.message_id)
            if stored is None:
                stored = await self._handle_once(command, data, attempt)
            else:
                log.info("%s of saga %s is a duplicate (message %s): its reply is sent again",
                         command.type, command.correlation_id, command.message_id,
                         extra=fields)  # fmt: skip
            if stored and command.reply_to:
                await self._send(command, stored)
        except asyncio.CancelledError:
            await _give_back(delivery)
            raise
        except Exception as exc:
            log.warning("could not handle %s of saga %s (%s: %s); it is delivered again in %.1fs",
                        command.type, command.correlation_id, type(exc).__name__, exc,
                        self.retry_delay, extra=fields)  # fmt: skip
            await self._pause(self.retry_delay)
            await _give_back(delivery)
            return
        await _ack(delivery)

    async def _handle_once(self, command: Envelope, data: Any, attempt: int) -> str:
        """Run the handler in an inbox transaction; the reply's JSON stored for the command."""
        async with self.inbox.transaction() as tx:
            claimed = await tx.claim(command.message_id)
            if claimed:
                answer = await handle(
                    tx,
                    command,
                    service=self.name,
                    handler=self._handlers.get(command.type),
                    data=data,
                    attempt=attempt,
                    executor=self._executor,
                    tracer_provider=self.tracer_provider,
                )
                stored = answer.to_json() if command.reply_to else ""
                await tx.record(command.message_id, stored)
        if not claimed:
            log.info("%s of saga %s was handled meanwhile by a duplicate (message %s)",
                     command.type, command.correlation_id, command.message_id,
                     extra=tags(command))  # fmt: skip
            return await self.inbox.seen(command.message_id) or ""
        return stored

    async def _send(self, command: Envelope, stored: str) -> None:
        """Publish the stored reply, retrying with backoff while the broker is unreachable."""
        try:
            answer = Envelope.from_json(stored)
        except CorruptMessage as exc:
            log.error("the stored reply to %s of saga %s is corrupt: %s", command.type,
                      command.correlation_id, exc, extra=tags(command))  # fmt: skip
            return
        topic = command.reply_to or ""
        delay = 0.05
        while True:
            try:
                await self.broker.publish(topic, answer)
                return
            except ConfigurationError as exc:  # reply_to is not a valid topic: never will be
                log.error("cannot reply to %s of saga %s: %s", command.type,
                          command.correlation_id, exc, extra=tags(command))  # fmt: skip
                return
            except BrokerUnavailable as exc:
                if self._closing.is_set():
                    raise
                log.warning("cannot send the reply to %s of saga %s (%s); retrying",
                            command.type, command.correlation_id, exc.reason,
                            extra=tags(command))  # fmt: skip
                await self._pause(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, _MAX_BACKOFF)


async def _close(deliveries: AsyncIterator[Delivery]) -> None:
    """End a subscription: what it holds unacked goes back to its group now."""
    closer = getattr(deliveries, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


async def _ack(delivery: Delivery) -> None:
    try:
        await delivery.ack()
    except Exception as exc:  # it comes again, and the inbox answers it
        log.warning("could not ack message %s: %s", delivery.envelope.message_id, exc)


async def _give_back(delivery: Delivery) -> None:
    try:
        async with asyncio.timeout(5.0):  # not wait_for: see Service._pause
            await delivery.nack(requeue=True)
    except Exception as exc:  # the broker redelivers it after its ack wait anyway
        log.warning("could not give message %s back: %s", delivery.envelope.message_id, exc)
