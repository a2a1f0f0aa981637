"""Consuming topics for one consumer group: what the event bus and the tracker share.

A :class:`TopicConsumer` subscribes ``group`` to each topic, hands every delivery to
``handle(topic, envelope)`` with at most ``concurrency`` handled at once, acks it when
``handle`` returns, and gives it back to the broker ``retry_delay`` seconds after ``handle``
raised (it is delivered again: handlers deduplicate by message id). A subscription that fails
is opened again after ``retry_delay``; one that the broker ends stops its topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from sagakit.errors import ConfigurationError
from sagakit.messaging import Broker, Delivery, Envelope

log = logging.getLogger("sagakit.consumer")

Handle = Callable[[str, Envelope], Awaitable[None]]


class TopicConsumer:
    """Delivers the messages of ``topics`` for ``group`` to ``handle``; see the module."""

    def __init__(
        self,
        broker: Broker,
        group: str,
        topics: Iterable[str],
        handle: Handle,
        *,
        name: str,
        concurrency: int = 16,
        retry_delay: float = 1.0,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
        self.broker = broker
        self.group = group
        self.topics = tuple(topics)
        self.name = name
        self.retry_delay = retry_delay
        self._handle = handle
        self._slots = asyncio.Semaphore(concurrency)
        self._consumers: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    async def start(self) -> None:
        """Subscribe to every topic and consume in the background. The groups exist on the
        broker when this returns, so messages published from then on reach them."""
        for topic in self.topics:
            deliveries = self.broker.subscribe(topic, self.group)
            declare = getattr(deliveries, "start", None)  # the adapters' Subscription.start
            if declare is not None:
                await declare()
            task = asyncio.create_task(
                self._consume(topic, deliveries), name=f"{self.name}-{topic}"
            )
            self._consumers.append(task)

    async def close(self, *, grace: float = 10.0) -> None:
        """Stop taking messages; let those in hand finish for up to ``grace`` seconds, then
        cancel them (they go back to the broker)."""
        self._closing.set()
        if self._inflight:
            _, late = await asyncio.wait(set(self._inflight), timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        self._consumers.clear()

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake up as soon as the consumer is closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _consume(self, topic: str, deliveries: Any) -> None:
        while not self._closing.is_set():
            try:
                if await self._pump(topic, deliveries):
                    log.info("%s: the broker ended the subscription to %s", self.name, topic)
                    return
            except Exception as exc:
                log.warning("%s: consuming %s failed (%s: %s); subscribing again in %.1fs",
                            self.name, topic, type(exc).__name__, exc,
                            self.retry_delay)  # fmt: skip
            finally:
                closer = getattr(deliveries, "aclose", None)
                if closer is not None:
                    with contextlib.suppress(Exception):
                        await closer()
            await self.pause(self.retry_delay)
            deliveries = self.broker.subscribe(topic, self.group)

    async def _pump(self, topic: str, deliveries: Any) -> bool:
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
            if self._closing.is_set():  # closing: leave it to another consumer
                self._slots.release()
                await give_back(delivery)
                continue
            task = asyncio.create_task(self._one(topic, delivery))
            self._inflight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: unexpected error", self.name, exc_info=task.exception())

    async def _one(self, topic: str, delivery: Delivery) -> None:
        envelope = delivery.envelope
        try:
            await self._handle(topic, envelope)
        except asyncio.CancelledError:
            await give_back(delivery)
            raise
        except Exception as exc:
            log.warning("%s: could not handle %s of saga %s (message %s; %s: %s); it is "
                        "delivered again in %.1fs", self.name, envelope.type,
                        envelope.correlation_id, envelope.message_id, type(exc).__name__, exc,
                        self.retry_delay)  # fmt: skip
            await self.pause(self.retry_delay)
            await give_back(delivery)
            return
        try:
            await delivery.ack()
        except Exception as exc:  # it comes again, and is recognised by its message id
            log.warning("%s: could not ack message %s: %s", self.name, envelope.message_id, exc)


async def give_back(delivery: Delivery) -> None:
    """Return a delivery to the broker to be delivered again (best effort: an unacked
    message is delivered again after the broker's ack wait anyway)."""
    try:
        await asyncio.wait_for(delivery.nack(requeue=True), 5.0)
    except Exception as exc:
        log.warning("could not give message %s back: %s", delivery.envelope.message_id, exc)
