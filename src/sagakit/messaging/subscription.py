"""The subscription iterator and the delivery every adapter hands out.

What must behave the same on every broker lives here, once: dropping corrupt messages,
settle-once deliveries, client-side ``ack_wait`` timers (for brokers without one), giving
messages back when a subscription closes, and ending the iterator on close. An adapter
subclasses :class:`Subscription` with how to declare its group, fill a local buffer and
give messages back.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sagakit.errors import BrokerError, CorruptMessage
from sagakit.messaging.base import Delivery
from sagakit.messaging.envelope import Envelope
from sagakit.messaging.options import BrokerOptions

log = logging.getLogger("sagakit.messaging")
T = TypeVar("T")


class Outcome(enum.Enum):
    ACK = "ack"
    REQUEUE = "requeue"  # deliver again
    DROP = "drop"  # settle without processing (nack without requeue, corrupt message)


Settle = Callable[[Outcome], Awaitable[None]]


@dataclass(slots=True)
class Incoming:
    """One message as the adapter received it, before it is parsed."""

    body: bytes
    redelivered: bool
    settle: Settle
    ident: str  # the broker's id of this delivery, for logs
    received: float = field(default_factory=time.monotonic)  # when it came from the broker


class BrokerDelivery(Delivery):
    """A received envelope; settled (acked or nacked) at most once, later calls do nothing.

    ``ack`` and ``nack`` do not raise when the connection to the broker is gone: the broker
    then delivers the message again, which at-least-once delivery allows (receivers drop
    duplicates by ``message_id``).
    """

    def __init__(self, envelope: Envelope, incoming: Incoming, owner: Subscription) -> None:
        self.envelope = envelope
        self.redelivered = incoming.redelivered
        self._incoming = incoming
        self._owner: Subscription | None = owner
        self._timer: asyncio.TimerHandle | None = None

    @property
    def settled(self) -> bool:
        return self._owner is None

    async def ack(self) -> None:
        await self._finish(Outcome.ACK)

    async def nack(self, *, requeue: bool = True) -> None:
        await self._finish(Outcome.REQUEUE if requeue else Outcome.DROP)

    def _detach(self) -> bool:
        """Mark settled; False if it already was."""
        if self._owner is None:
            return False
        self._owner._unsettled.pop(id(self), None)
        self._owner = None
        if self._timer is not None:
            self._timer.cancel()
        return True

    async def _finish(self, outcome: Outcome) -> None:
        if self._detach():
            await settle_quietly(self._incoming, outcome)


async def settle_quietly(incoming: Incoming, outcome: Outcome) -> None:
    try:
        await incoming.settle(outcome)
    except Exception as exc:  # the broker redelivers what we could not settle
        log.warning(
            "could not %s message %s (%s: %s); the broker will deliver it again",
            outcome.value,
            incoming.ident,
            type(exc).__name__,
            exc,
        )


class Subscription(ABC, AsyncIterator[Delivery]):
    """The deliveries of one topic for one consumer group (see :meth:`Broker.subscribe`).

    The group is declared on the broker by :meth:`start`, which the first ``__anext__`` calls;
    call it yourself to be sure the group exists before messages are published. End it with
    :meth:`aclose` (or ``async with``), or it ends when its broker closes; messages it holds
    unacked then go back to the group.
    """

    #: ``ack_wait`` is enforced here (RabbitMQ, memory) rather than by the broker.
    client_ack_wait = False

    def __init__(self, topic: str, group: str, options: BrokerOptions, url: str) -> None:
        self.topic, self.group, self.options, self.url = topic, group, options, url
        self._started = False
        self._closed = False
        self._start_lock = asyncio.Lock()
        self._unsettled: dict[int, BrokerDelivery] = {}
        self._waiting: asyncio.Future[Any] | None = None
        self._on_close: Callable[[Subscription], None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    # -- for the adapter ------------------------------------------------------------------

    @abstractmethod
    async def _open(self) -> None:
        """Declare the durable group and start receiving."""

    @abstractmethod
    def _take(self) -> Incoming | None:
        """The next buffered message, or None if there is none now."""

    @abstractmethod
    async def _fill(self) -> None:
        """Wait a while for messages to arrive in the buffer (may return with none)."""

    @abstractmethod
    async def _release(self, unsettled: list[Incoming]) -> None:
        """Stop receiving; give back ``unsettled`` and anything still buffered."""

    def _interrupted(self) -> None:
        """The caller stopped waiting (its ``__anext__`` was cancelled); a wait for messages
        may have finished just before, and what it was woken for must go to another."""

    # -- the iterator -----------------------------------------------------------------------

    async def start(self) -> None:
        """Declare the group on the broker and begin receiving; does nothing the second time."""
        async with self._start_lock:
            if self._closed:
                raise BrokerError(f"the subscription to {self.topic!r} is closed")
            if not self._started:
                await self._open()
                self._started = True

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Delivery:
        if not self._started and not self._closed:
            await self.start()
        while not self._closed:
            incoming = self._take()
            if incoming is None:
                await self._interruptible(self._fill())
                continue
            try:
                envelope = Envelope.from_json(incoming.body)
            except CorruptMessage as exc:
                log.warning(
                    "dropped message %s on topic %r for group %r: %s",
                    incoming.ident,
                    self.topic,
                    self.group,
                    exc,
                )
                await settle_quietly(incoming, Outcome.DROP)
                continue
            return self._hand_out(envelope, incoming)
        raise StopAsyncIteration

    def _hand_out(self, envelope: Envelope, incoming: Incoming) -> BrokerDelivery:
        delivery = BrokerDelivery(envelope, incoming, self)
        self._unsettled[id(delivery)] = delivery
        if self.client_ack_wait:
            loop = asyncio.get_running_loop()
            delivery._timer = loop.call_later(self.options.ack_wait, self._expire, delivery)
        return delivery

    def _expire(self, delivery: BrokerDelivery) -> None:
        if delivery.settled:
            return
        log.info(
            "message %s was not acked within %s s; it is delivered again",
            delivery.envelope.message_id,
            self.options.ack_wait,
        )
        spawn(delivery.nack(requeue=True))

    async def _interruptible(self, work: Awaitable[T]) -> T | None:
        """Run ``work``; None if :meth:`aclose` interrupted it."""
        task = asyncio.ensure_future(work)
        self._waiting = task
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            self._interrupted()
            raise
        finally:
            self._waiting = None
        return None if task.cancelled() else task.result()

    async def aclose(self) -> None:
        """End this subscription: its iterator stops, unacked messages go back to the group."""
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close(self)
        if self._waiting is not None:
            self._waiting.cancel()
        async with self._start_lock:  # a start() in flight finishes before we release
            pending = list(self._unsettled.values())
            for delivery in pending:
                delivery._detach()
            if self._started:
                await self._release([d._incoming for d in pending])

    async def __aenter__(self) -> Subscription:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


_background: set[asyncio.Future[Any]] = set()


def spawn(work: Awaitable[Any]) -> None:
    """Run ``work`` in the background, keeping a reference until it is done."""
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


class IdleSubscription(Subscription):
    """The subscription of a broker that is closed (it ends) or not connected (it raises)."""

    def __init__(
        self, topic: str, group: str, options: BrokerOptions, url: str, *, ended: bool
    ) -> None:
        super().__init__(topic, group, options, url)
        self._closed = ended

    async def _open(self) -> None:
        raise BrokerError(f"broker {self.url} is not connected; await connect() first")

    def _take(self) -> Incoming | None:
        return None

    async def _fill(self) -> None:
        return None

    async def _release(self, unsettled: list[Incoming]) -> None:
        return None
