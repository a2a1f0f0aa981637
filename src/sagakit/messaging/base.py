"""The Broker protocol: the only thing sagakit knows about message brokers.

Semantics every adapter keeps (the contract suite in tests/integration/test_broker_contract.py
checks them on every broker):

- ``publish`` returns once the broker has the message durably (publisher confirms, a JetStream
  ack, an ``XADD``); it raises :class:`~sagakit.errors.BrokerUnavailable` when the broker
  cannot be reached, and the caller retries.
- ``subscribe(topic, group)`` is a durable subscription: every *group* gets every message
  published to ``topic`` after the group first subscribed, and within a group each message
  goes to one consumer (competing consumers). Delivery is at least once: a message is
  delivered again until it is acked: after ``nack()``, when its consumer goes away, or after
  ``ack_wait`` seconds without an ack.
- ``declare(topic, group)`` makes the group's durable queue exist without consuming, so that
  messages published from then on are kept for it: the outbox relay declares a command's
  service group (the command's first word, ``InventoryService`` for
  ``InventoryService.ReserveItems``) before its first publish, so commands sent before the
  service first ran wait for it. Messages published to a topic no group was declared or
  subscribed on may be dropped.
- A subscription outlives broker restarts: the adapter reconnects and goes on; messages
  published and confirmed before the restart are not lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from sagakit.messaging.envelope import Envelope


class Delivery(Protocol):
    """A received message, to be acked once handled."""

    envelope: Envelope
    redelivered: bool  # True if the broker delivered it before (best effort per broker)

    async def ack(self) -> None: ...

    async def nack(self, *, requeue: bool = True) -> None:
        """Give the message back: delivered again (``requeue``) or dropped."""
        ...


class Broker(Protocol):
    url: str

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, topic: str, message: Envelope) -> None: ...

    async def declare(self, topic: str, group: str) -> None:
        """Make ``group``'s durable subscription of ``topic`` exist (idempotent)."""
        ...

    def subscribe(self, topic: str, group: str) -> AsyncIterator[Delivery]:
        """Deliveries of ``topic`` for consumer group ``group``, until the broker closes."""
        ...
