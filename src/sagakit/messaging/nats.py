"""NATS JetStream (nats-py): the Broker contract on one stream per prefix.

Names: one stream ``<prefix>`` on file storage with subjects ``<prefix>.>``; a topic is the
subject ``<prefix>.<topic>``; a group is a durable pull consumer
``<group>_<topic with dots as _>_<hash>`` filtered on that subject, delivering only messages
published after it was created. ``publish`` waits for JetStream's ack and sets
``Nats-Msg-Id`` to the envelope's id, so a publish retried within the stream's duplicate window
(two minutes) is stored once.

Retention: the stream keeps messages by limits, and sagakit sets none, so nothing is removed
until an operator sets ``max_age`` or ``max_bytes`` on it (an existing stream is used as it
is). Interest retention would trim acked messages by itself, but NATS 2.9 drops, at a restart,
messages one consumer acked that another consumer had not yet received (the restart test
caught it), so it is not used.

Delivery: explicit acks with the consumer's ``ack_wait``; messages are fetched in batches of
``prefetch``. ``nack(requeue=True)`` is ``NAK`` (redelivered at once), ``nack(requeue=False)``
and corrupt messages are ``TERM``. A closing subscription NAKs what it holds; one whose process
died is redelivered after ``ack_wait``. A fetched message that waited in the local batch past
``ack_wait`` is skipped, since JetStream has already made it available again.

Reconnection: the client reconnects forever; the stream and its consumers live in the
server's store, so a subscription goes on fetching after a restart. ``publish`` while the
client is disconnected raises :class:`~sagakit.errors.BrokerUnavailable` at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from sagakit.errors import BrokerError, BrokerUnavailable
from sagakit.messaging.common import BrokerBase
from sagakit.messaging.options import Backoff, BrokerOptions
from sagakit.messaging.subscription import Incoming, Outcome, Settle, Subscription

__all__ = ["NatsBroker"]

log = logging.getLogger("sagakit.messaging.nats")

RECONNECT_WAIT = 1  # seconds between reconnect attempts (nats-py types it as int)
FETCH_WAIT = 2.0  # an idle pull request's lifetime; bounds how long a lost request stalls
BATCH_WAIT = 0.1  # how long a busy subscription waits to fill a batch
_UNAVAILABLE = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
    OSError,
)
_FAILED = (*_UNAVAILABLE, nats.errors.Error)


def translate(exc: BaseException, where: str) -> BrokerError:
    """The sagakit error for a nats-py error (raise it ``from exc``)."""
    if isinstance(exc, nats.errors.AuthorizationError):
        return BrokerError(f"NATS {where} refused the credentials: {exc}")
    if isinstance(exc, nats.js.errors.APIError) and not isinstance(exc, _UNAVAILABLE):
        return BrokerError(f"NATS JetStream {where} refused: {exc}")
    return BrokerUnavailable(where, f"{type(exc).__name__}: {exc}")


def durable_name(topic: str, group: str) -> str:
    """The consumer of ``group`` on ``topic``: readable, and distinct for distinct pairs."""
    digest = hashlib.sha256(f"{group}\0{topic}".encode()).hexdigest()[:8]
    return f"{group}_{topic.replace('.', '_')}_{digest}"


class NatsBroker(BrokerBase):
    """The broker of ``nats://host:4222`` (JetStream must be enabled on the server).

    Args:
        url: the NATS URL; ``?prefix=...&ack_wait=...&prefetch=...&timeout=...`` are read here.
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
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None

    @property
    def stream(self) -> str:
        return self.options.prefix

    def subject(self, topic: str) -> str:
        return f"{self.options.prefix}.{topic}"

    async def _connect(self) -> None:
        nc = Client()
        self._nc = nc
        try:
            # Reconnect forever once connected; the first connection gets `timeout` seconds.
            await asyncio.wait_for(
                nc.connect(
                    servers=[self._driver_url],
                    name=f"sagakit {self.options.prefix}",
                    connect_timeout=max(1, int(self.options.timeout)),
                    reconnect_time_wait=RECONNECT_WAIT,
                    max_reconnect_attempts=-1,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                ),
                self.options.timeout,
            )
            self._js = nc.jetstream(timeout=self.options.timeout)
            await ensure_stream(self._js, self.stream)
        except _FAILED as exc:
            await self._disconnect()
            raise translate(exc, self.where) from exc

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS %s: %s: %s", self.where, type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        if self._connected and not self._closed:
            log.warning("NATS %s: disconnected; reconnecting", self.where)

    async def _on_reconnected(self) -> None:
        log.warning("NATS %s: reconnected", self.where)

    async def _disconnect(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                log.debug("closing %s: %s", self.where, exc)

    async def _publish(self, topic: str, body: bytes, message_id: str) -> None:
        assert self._nc is not None
        assert self._js is not None
        if not self._nc.is_connected:
            raise BrokerUnavailable(self.where, "the connection is lost; reconnecting")
        try:
            await self._js.publish(
                self.subject(topic),
                body,
                timeout=self.options.timeout,
                stream=self.stream,
                headers={"Nats-Msg-Id": message_id},
            )
        except _FAILED as exc:
            raise translate(exc, self.where) from exc

    async def _declare(self, topic: str, group: str) -> None:
        assert self._js is not None
        try:
            await ensure_consumer(self._js, self.stream, topic, group, self.options.ack_wait)
        except _FAILED as exc:
            raise translate(exc, self.where) from exc

    def _subscription(self, topic: str, group: str) -> Subscription:
        assert self._js is not None
        return _NatsSubscription(topic, group, self.options, self.where, self._js)


async def ensure_stream(js: JetStreamContext, name: str) -> None:
    """Create the stream of a prefix unless it exists (an existing one is used as it is)."""
    try:
        await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=[f"{name}.>"],
                storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS,
            )
        )


async def ensure_consumer(
    js: JetStreamContext, stream: str, topic: str, group: str, ack_wait: float
) -> str:
    """Create the durable consumer of ``group`` on ``topic`` unless it exists; its name."""
    await ensure_stream(js, stream)
    durable = durable_name(topic, group)
    try:
        await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        await js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=durable,
                filter_subject=f"{stream}.{topic}",
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ack_wait,
                deliver_policy=DeliverPolicy.NEW,
                max_deliver=-1,
            ),
        )
    return durable


class _NatsSubscription(Subscription):
    def __init__(
        self, topic: str, group: str, options: BrokerOptions, url: str, js: JetStreamContext
    ) -> None:
        super().__init__(topic, group, options, url)
        self._js = js
        self._durable = durable_name(topic, group)
        self._stream = options.prefix
        self._pull: JetStreamContext.PullSubscription | None = None
        self._buffer: deque[tuple[float, Msg]] = deque()
        self._backoff = Backoff()
        self._busy = False

    async def _open(self) -> None:
        try:
            await self._declare()
        except _FAILED as exc:
            raise translate(exc, self.url) from exc

    async def _declare(self) -> None:
        await ensure_consumer(self._js, self._stream, self.topic, self.group, self.options.ack_wait)
        if self._pull is None:
            self._pull = await self._js.pull_subscribe_bind(self._durable, stream=self._stream)

    def _take(self) -> Incoming | None:
        while self._buffer:
            fetched, msg = self._buffer.popleft()
            if time.monotonic() - fetched > self.options.ack_wait:
                continue  # JetStream has made it available again
            return Incoming(
                body=msg.data,
                received=fetched,
                redelivered=msg.metadata.num_delivered > 1,
                settle=_settler(msg),
                ident=_ident(msg),
            )
        return None

    async def _fill(self) -> None:
        # nats-py's fetch of a batch waits until the batch is full or its request expires, so
        # an idle subscription waits for one message (handed out at once), and a busy one
        # takes what is there in batches until a batch comes back empty.
        assert self._pull is not None
        batch, wait = (self.options.prefetch, BATCH_WAIT) if self._busy else (1, FETCH_WAIT)
        try:
            msgs = await self._pull.fetch(batch, timeout=wait)
        except TimeoutError:
            self._busy = False
            return
        except nats.js.errors.NotFoundError as exc:
            # The stream or consumer was deleted (or lost): declare them again.
            log.warning("NATS consumer %s is gone (%s); declaring it again", self._durable, exc)
            await self._retry(self._declare)
            return
        except _FAILED as exc:
            log.debug("fetching %s: %s: %s", self._durable, type(exc).__name__, exc)
            await asyncio.sleep(self._backoff.next())
            return
        self._backoff.reset()
        self._busy = True
        now = time.monotonic()
        self._buffer.extend((now, msg) for msg in msgs)

    async def _retry(self, work: Any) -> None:
        try:
            await work()
        except _FAILED as exc:
            log.debug("declaring %s: %s", self._durable, exc)
            await asyncio.sleep(self._backoff.next())

    async def _release(self, unsettled: list[Incoming]) -> None:
        # Those held past ack_wait are JetStream's again (maybe delivered to another consumer).
        fresh = time.monotonic() - self.options.ack_wait
        buffered = [_settler(msg) for fetched, msg in self._buffer if fetched > fresh]
        self._buffer.clear()
        for settle in [*(i.settle for i in unsettled if i.received > fresh), *buffered]:
            try:
                await settle(Outcome.REQUEUE)
            except (nats.errors.Error, OSError) as exc:
                log.debug("giving back a message of %s: %s", self._durable, exc)
        pull, self._pull = self._pull, None
        if pull is not None:
            try:
                await pull.unsubscribe()
            except (nats.errors.Error, ValueError) as exc:
                log.debug("unsubscribing %s: %s", self._durable, exc)


def _ident(msg: Msg) -> str:
    try:
        return f"stream seq {msg.metadata.sequence.stream}"
    except (nats.errors.Error, AttributeError, ValueError):
        return "unknown"


def _settler(msg: Msg) -> Settle:
    async def settle(outcome: Outcome) -> None:
        if outcome is Outcome.ACK:
            await msg.ack()
        elif outcome is Outcome.REQUEUE:
            await msg.nak()
        else:
            await msg.term()

    return settle
