"""RabbitMQ (aio-pika): the Broker contract on a durable topic exchange.

Names: one durable topic exchange ``<prefix>``; a topic is a routing key; a group is a
durable queue ``<prefix>.<group>.<topic>`` bound to the exchange with the topic as its key.
Messages are persistent and published with publisher confirms, so ``publish`` returns once
RabbitMQ has written the message to disk (or to every bound queue).

Delivery: manual acks with ``prefetch_count = prefetch`` per subscription, each subscription
on its own channel. ``nack(requeue=True)`` is ``basic.nack`` with requeue; a channel that
closes (the subscription or its process ends) hands its unacked messages back to the queue.
RabbitMQ has no per-message ack deadline, so ``ack_wait`` is kept here: a delivery not
settled within ``ack_wait`` seconds is nacked with requeue and a late ``ack`` does nothing.

Reconnection: ``connect_robust`` reconnects every second and restores channels, the exchange,
queues, bindings and consumers. Messages that were buffered from the lost channel are dropped
here (RabbitMQ redelivers them on the new one); ``publish`` during the outage raises
:class:`~sagakit.errors.BrokerUnavailable` at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import DeliveryError, ProbableAuthenticationError

from sagakit.errors import BrokerError, BrokerUnavailable
from sagakit.messaging.common import BrokerBase
from sagakit.messaging.options import BrokerOptions
from sagakit.messaging.subscription import (
    Incoming,
    Outcome,
    Settle,
    Subscription,
    settle_quietly,
    spawn,
)

__all__ = ["RabbitBroker"]

log = logging.getLogger("sagakit.messaging.rabbitmq")

RECONNECT_INTERVAL = 1.0
# What a lost connection raises from aio-pika/aiormq (a closed channel is a RuntimeError).
_LOST = (
    aiormq.exceptions.AMQPConnectionError,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,
)
# ...and what RabbitMQ refusing an operation raises (access refused, a queue declared with
# other arguments, ...).
_FAILED = (*_LOST, aiormq.exceptions.AMQPError)


def translate(exc: BaseException, where: str) -> BrokerError:
    """The sagakit error for an aio-pika/aiormq error (raise it ``from exc``)."""
    if isinstance(exc, aiormq.exceptions.AuthenticationError | ProbableAuthenticationError):
        return BrokerError(f"RabbitMQ {where} refused the credentials: {exc}")
    if isinstance(exc, _LOST):
        return BrokerUnavailable(where, f"{type(exc).__name__}: {exc}")
    return BrokerError(f"RabbitMQ {where} refused: {type(exc).__name__}: {exc}")


class RabbitBroker(BrokerBase):
    """The broker of ``amqp://user:password@host:5672/vhost``.

    Args:
        url: the AMQP URL; ``?prefix=...&ack_wait=...&prefetch=...&timeout=...`` are read
            here and removed, other query parameters go to aio-pika.
        prefix, ack_wait, prefetch, timeout: see :class:`~sagakit.messaging.common.BrokerOptions`.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        ack_wait: float | None = None,
        prefetch: int | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(url, prefix=prefix, ack_wait=ack_wait, prefetch=prefetch, timeout=timeout)
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self.declared_queues: set[str] = set()

    def queue_name(self, topic: str, group: str) -> str:
        return f"{self.options.prefix}.{group}.{topic}"

    async def _connect(self) -> None:
        try:
            self._connection = await aio_pika.connect_robust(
                self._driver_url,
                timeout=self.options.timeout,
                reconnect_interval=RECONNECT_INTERVAL,
                client_properties={"connection_name": f"sagakit {self.options.prefix}"},
            )
            channel = await self._connection.channel(publisher_confirms=True)
            self._exchange = await declare_exchange(channel, self.options.prefix)
        except _FAILED as exc:
            await self._disconnect()
            raise translate(exc, self.where) from exc

    async def _disconnect(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None:
            try:
                await connection.close()
            except _FAILED as exc:
                log.debug("closing %s: %s", self.where, exc)

    async def _publish(self, topic: str, body: bytes, message_id: str) -> None:
        assert self._connection is not None
        assert self._exchange is not None
        if not self._connection.connected.is_set():
            raise BrokerUnavailable(self.where, "the connection is lost; reconnecting")
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
        )
        try:
            await asyncio.wait_for(
                self._exchange.publish(message, routing_key=topic, mandatory=False),
                self.options.timeout,
            )
        except DeliveryError as exc:
            raise BrokerError(f"RabbitMQ {self.where} refused message {message_id}") from exc
        except TimeoutError as exc:
            raise BrokerUnavailable(
                self.where, f"no publisher confirm within {self.options.timeout} s"
            ) from exc
        except _FAILED as exc:
            raise translate(exc, self.where) from exc

    async def _declare(self, topic: str, group: str) -> None:
        assert self._connection is not None
        name = self.queue_name(topic, group)
        self.declared_queues.add(name)
        try:
            async with self._connection.channel(publisher_confirms=False) as channel:
                await declare_queue(channel, self.options.prefix, name, topic)
        except _FAILED as exc:
            raise translate(exc, self.where) from exc

    def _subscription(self, topic: str, group: str) -> Subscription:
        assert self._connection is not None
        name = self.queue_name(topic, group)
        self.declared_queues.add(name)
        return _RabbitSubscription(
            topic, group, self.options, self.where, connection=self._connection, queue_name=name
        )


async def declare_exchange(channel: AbstractChannel, name: str) -> AbstractExchange:
    return await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)


async def declare_queue(
    channel: AbstractChannel, exchange_name: str, name: str, topic: str
) -> AbstractQueue:
    """The durable queue of a group, bound to the exchange with the topic as its key."""
    exchange = await declare_exchange(channel, exchange_name)
    queue = await channel.declare_queue(name, durable=True)
    await queue.bind(exchange, routing_key=topic)
    return queue


class _RabbitSubscription(Subscription):
    client_ack_wait = True

    def __init__(
        self,
        topic: str,
        group: str,
        options: BrokerOptions,
        url: str,
        *,
        connection: AbstractRobustConnection,
        queue_name: str,
    ) -> None:
        super().__init__(topic, group, options, url)
        self._connection = connection
        self._queue_name = queue_name
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._buffer: deque[_Buffered] = deque()
        self._arrived = asyncio.Event()

    async def _open(self) -> None:
        try:
            self._channel = await self._connection.channel(publisher_confirms=False)
            await self._channel.set_qos(prefetch_count=self.options.prefetch)
            self._queue = await declare_queue(
                self._channel, self.options.prefix, self._queue_name, self.topic
            )
            self._tag = await self._queue.consume(self._on_message)
        except _FAILED as exc:
            await self._close_channel()
            raise translate(exc, self.url) from exc

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # RabbitMQ pushes up to `prefetch` messages whether or not anyone iterates; one held
        # here past ack_wait (its iterator was abandoned without aclose()) goes back.
        entry = _Buffered(message)
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(self.options.ack_wait, self._give_back, entry)
        self._buffer.append(entry)
        self._arrived.set()

    def _give_back(self, entry: _Buffered) -> None:
        try:
            self._buffer.remove(entry)
        except ValueError:
            return
        if not _alive(entry.message):
            return
        log.info("message %s waited %s s unread; it goes back", entry.ident, self.options.ack_wait)
        spawn(self._pause_and_requeue(entry.message))

    async def _pause_and_requeue(self, message: AbstractIncomingMessage) -> None:
        # Nobody reads here: stop RabbitMQ sending to this consumer (else the message may come
        # straight back) until someone iterates again (_fill consumes anew).
        tag, self._tag = self._tag, None
        if tag is not None and self._queue is not None:
            try:
                await self._queue.cancel(tag)
            except _FAILED as exc:
                log.debug("pausing the consumer of %s: %s", self._queue_name, exc)
        await settle_quietly(_incoming(message), Outcome.REQUEUE)

    def _take(self) -> Incoming | None:
        while self._buffer:
            entry = self._buffer.popleft()
            entry.timer.cancel()
            if not _alive(entry.message):
                continue  # delivered on a channel lost to a reconnect: RabbitMQ redelivers it
            return _incoming(entry.message)
        self._arrived.clear()
        return None

    async def _fill(self) -> None:
        if self._tag is None and self._queue is not None:
            try:
                self._tag = await self._queue.consume(self._on_message)
            except _FAILED as exc:
                raise translate(exc, self.url) from exc
        await self._arrived.wait()

    async def _release(self, unsettled: list[Incoming]) -> None:
        # Closing the channel hands every unacked message (given out or buffered) back.
        for entry in self._buffer:
            entry.timer.cancel()
        self._buffer.clear()
        if self._queue is not None and self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except _FAILED as exc:
                log.debug("cancelling consumer of %s: %s", self._queue_name, exc)
        await self._close_channel()

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            try:
                await channel.close()
            except _FAILED as exc:
                log.debug("closing channel of %s: %s", self._queue_name, exc)


class _Buffered:
    __slots__ = ("message", "timer")

    def __init__(self, message: AbstractIncomingMessage) -> None:
        self.message = message
        self.timer: asyncio.TimerHandle

    @property
    def ident(self) -> str:
        return self.message.message_id or f"delivery-tag {self.message.delivery_tag}"


def _alive(message: AbstractIncomingMessage) -> bool:
    """Whether the channel the message came on is still open (so it can be settled)."""
    try:
        message.channel  # noqa: B018 - raises if the channel is gone
    except aiormq.exceptions.ChannelInvalidStateError:
        return False
    return True


def _incoming(message: AbstractIncomingMessage) -> Incoming:
    return Incoming(
        body=message.body,
        redelivered=bool(message.redelivered),
        settle=_settler(message),
        ident=message.message_id or f"delivery-tag {message.delivery_tag}",
    )


def _settler(message: AbstractIncomingMessage) -> Settle:
    async def settle(outcome: Outcome) -> None:
        if outcome is Outcome.ACK:
            await message.ack()
        elif outcome is Outcome.REQUEUE:
            await message.nack(requeue=True)
        else:
            await message.reject(requeue=False)

    return settle
