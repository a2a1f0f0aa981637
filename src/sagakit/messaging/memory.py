"""An in-process broker for unit tests: the Broker contract with no I/O.

Brokers opened on the same ``memory://name`` (and prefix) in one process share their topics
and groups, so a service and an orchestrator under test can talk through two instances, and
a group declared by one instance keeps collecting messages after that instance closes, as a
durable queue would. Messages travel as JSON bytes, like on the real brokers, so nothing
unserialisable slips through a unit test.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sagakit.messaging.common import BrokerBase
from sagakit.messaging.options import BrokerOptions
from sagakit.messaging.subscription import Incoming, Outcome, Subscription

__all__ = ["MemoryBroker"]

_ids = itertools.count(1)


@dataclass(slots=True)
class _Message:
    body: bytes
    ident: str = field(default_factory=lambda: f"memory-{next(_ids)}")
    deliveries: int = 0


class _Group:
    """A durable queue: the messages of one topic for one group, and the consumers waiting."""

    def __init__(self) -> None:
        self.ready: deque[_Message] = deque()
        self.waiters: deque[asyncio.Future[None]] = deque()

    def put(self, message: _Message, *, front: bool = False) -> None:
        if front:
            self.ready.appendleft(message)
        else:
            self.ready.append(message)
        self.wake_one()

    def wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            # A waiter of an event loop that is gone (an earlier test) is skipped.
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(None)
                return


@dataclass(slots=True)
class _Hub:
    topics: dict[str, dict[str, _Group]] = field(default_factory=dict)

    def group(self, topic: str, group: str) -> _Group:
        return self.topics.setdefault(topic, {}).setdefault(group, _Group())


# One hub per broker name and prefix, for the life of the process: that is what lets two
# MemoryBroker instances (a service and its caller) share queues. Tests use distinct names.
_HUBS: dict[tuple[str, str], _Hub] = {}


class MemoryBroker(BrokerBase):
    """The in-memory broker of ``memory://name``.

    Args:
        url: ``memory://name``, optionally with ``?prefix=...&ack_wait=...``.
        prefix, ack_wait, prefetch, timeout: see :class:`~sagakit.messaging.common.BrokerOptions`
            (``prefetch`` and ``timeout`` have no effect here).
    """

    def __init__(
        self,
        url: str = "memory://default",
        *,
        prefix: str | None = None,
        ack_wait: float | None = None,
        prefetch: int | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(url, prefix=prefix, ack_wait=ack_wait, prefetch=prefetch, timeout=timeout)
        name = urlsplit(self._driver_url).netloc or "default"
        self._hub = _HUBS.setdefault((name, self.options.prefix), _Hub())

    async def _connect(self) -> None:
        pass

    async def _disconnect(self) -> None:
        pass

    async def _publish(self, topic: str, body: bytes, message_id: str) -> None:
        for group in self._hub.topics.get(topic, {}).values():
            group.put(_Message(body))

    async def _declare(self, topic: str, group: str) -> None:
        self._hub.group(topic, group)

    def _subscription(self, topic: str, group: str) -> Subscription:
        return _MemorySubscription(topic, group, self.options, self.where, self._hub)


class _MemorySubscription(Subscription):
    client_ack_wait = True

    def __init__(self, topic: str, group: str, options: BrokerOptions, url: str, hub: _Hub) -> None:
        super().__init__(topic, group, options, url)
        self._hub = hub
        self._queue: _Group | None = None

    async def _open(self) -> None:
        self._queue = self._hub.group(self.topic, self.group)

    def _take(self) -> Incoming | None:
        assert self._queue is not None
        if not self._queue.ready:
            return None
        message = self._queue.ready.popleft()
        message.deliveries += 1
        queue = self._queue

        async def settle(outcome: Outcome) -> None:
            if outcome is Outcome.REQUEUE:
                queue.put(message, front=True)

        return Incoming(
            body=message.body,
            redelivered=message.deliveries > 1,
            settle=settle,
            ident=message.ident,
        )

    async def _fill(self) -> None:
        assert self._queue is not None
        if self._queue.ready:  # published since _take looked (this runs in a task of its own)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._queue.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._queue.wake_one()  # the message we were woken for goes to another
            raise

    def _interrupted(self) -> None:
        if self._queue is not None and self._queue.ready:
            self._queue.wake_one()

    async def _release(self, unsettled: list[Incoming]) -> None:
        for incoming in reversed(unsettled):
            await incoming.settle(Outcome.REQUEUE)
        self._interrupted()
