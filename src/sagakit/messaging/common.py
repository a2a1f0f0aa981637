"""The lifecycle every broker adapter shares: connect, close, and the checks around publish,
declare and subscribe. An adapter implements the ``_`` methods for its broker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from abc import ABC, abstractmethod
from typing import Any

from sagakit.errors import BrokerError
from sagakit.messaging.envelope import Envelope
from sagakit.messaging.options import check_topic, check_word, redact, split_options
from sagakit.messaging.subscription import IdleSubscription, Subscription

log = logging.getLogger("sagakit.messaging")


class BrokerBase(ABC):
    """Lifecycle and checks shared by the adapters; they implement the ``_`` methods."""

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self._driver_url, self.options = split_options(url, **options)
        self._connected = False
        self._closed = False
        self._connect_lock = asyncio.Lock()
        self._subscriptions: set[Subscription] = set()

    @property
    def where(self) -> str:
        """The URL without its password, for messages."""
        return redact(self.url)

    @abstractmethod
    async def _connect(self) -> None: ...

    @abstractmethod
    async def _disconnect(self) -> None: ...

    @abstractmethod
    async def _publish(self, topic: str, body: bytes, message_id: str) -> None: ...

    @abstractmethod
    def _subscription(self, topic: str, group: str) -> Subscription: ...

    async def connect(self) -> None:
        """Connect (and declare the namespace); raises BrokerUnavailable if it cannot."""
        async with self._connect_lock:
            if self._closed:
                raise BrokerError(f"broker {self.where} is closed; open a new one")
            if not self._connected:
                await self._connect()
                self._connected = True

    async def close(self) -> None:
        """End every subscription (unacked messages go back) and disconnect; idempotent."""
        async with self._connect_lock:
            if self._closed:
                return
            self._closed = True
            subscriptions, self._subscriptions = list(self._subscriptions), set()
            results = await asyncio.gather(
                *(s.aclose() for s in subscriptions), return_exceptions=True
            )
            for result in results:
                if isinstance(result, Exception):
                    log.warning("closing a subscription of %s failed: %r", self.where, result)
            if self._connected:
                self._connected = False
                await self._disconnect()

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerError(f"broker {self.where} is closed; open a new one to go on")
        if not self._connected:
            raise BrokerError(f"broker {self.where} is not connected; await connect() first")

    async def publish(self, topic: str, message: Envelope) -> None:
        """Send ``message`` to ``topic``; returns once the broker holds it durably."""
        check_topic(topic)
        self._check_open()
        await self._publish(topic, message.to_bytes(), message.message_id)

    async def publish_raw(self, topic: str, body: bytes) -> None:
        """Send bytes that need not be an envelope (tests of corrupt-message handling)."""
        check_topic(topic)
        self._check_open()
        await self._publish(topic, body, f"raw-{time.time_ns()}-{random.getrandbits(32)}")

    @abstractmethod
    async def _declare(self, topic: str, group: str) -> None: ...

    async def declare(self, topic: str, group: str) -> None:
        """Make ``group``'s durable subscription of ``topic`` exist, without consuming."""
        check_topic(topic)
        check_word("group", group)
        self._check_open()
        await self._declare(topic, group)

    def subscribe(self, topic: str, group: str) -> Subscription:
        """A durable subscription of ``group`` to ``topic``; see :class:`Subscription`.

        On a closed broker the iterator ends at once; on one not connected yet, the first
        ``__anext__`` (or ``start()``) raises :class:`BrokerError`.
        """
        check_topic(topic)
        check_word("group", group)
        if self._closed or not self._connected:
            return IdleSubscription(topic, group, self.options, self.where, ended=self._closed)
        subscription = self._subscription(topic, group)
        subscription._on_close = self._subscriptions.discard
        self._subscriptions.add(subscription)
        return subscription
