"""The outbox relay: publishes the commands that committed journal entries left in the outbox.

A command is written to the outbox in the same transaction as the journal entry that starts
its step (see :mod:`sagakit.remote_steps`), so no command is lost and none leaves for a step
that was not recorded. The relay claims a batch (held for ``lease`` seconds, so relays of
several workers never send one message at the same time), publishes each message, waits for
the broker's confirmation, and deletes it. A broker that is down delays messages and loses
none: they stay in the outbox and are retried with backoff. A message may be published twice
(a relay that died between the publish and the delete); services deduplicate by message id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sagakit.errors import BrokerError, CorruptMessage, StoreError
from sagakit.messaging.base import Broker
from sagakit.messaging.envelope import Envelope
from sagakit.store.base import OutboxMessage, Store

log = logging.getLogger("sagakit.outbox")


class OutboxRelay:
    """Relays a store's outbox to a broker until stopped.

    Args:
        batch: messages claimed at a time.
        concurrency: publishes awaiting the broker's confirmation at once.
        lease: seconds a claimed message is held before another relay may send it.
        poll: seconds between looks at the outbox when nothing woke the relay.
    """

    def __init__(
        self,
        store: Store,
        broker: Broker,
        *,
        batch: int = 200,
        lease: float = 10.0,
        poll: float = 1.0,
        max_backoff: float = 5.0,
        concurrency: int = 32,
    ) -> None:
        self.store = store
        self.broker = broker
        self.batch = batch
        self.lease = lease
        self.poll = poll
        self.max_backoff = max_backoff
        self.relayed = 0
        self._declared: set[str] = set()
        # Publishes in flight at once: a broker client's connection pool has a limit too.
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """A command was written: look at the outbox now."""
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="sagakit-outbox-relay")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                sent, full = await self.relay_once()
                failures = 0 if sent or not full else failures
            except (StoreError, BrokerError, OSError) as exc:
                failures += 1
                log.warning("relaying the outbox failed (%s); retrying", exc)
                full = False
            if full and not failures:
                continue  # more are waiting
            wait = self.poll if not failures else min(self.max_backoff, 0.1 * 2**failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def relay_once(self) -> tuple[int, bool]:
        """Claim one batch and publish it; return (messages sent, whether the batch was full).
        Raises the broker's error if none could be sent."""
        claimed = await self.store.outbox_claim(self.batch, self.lease)
        if not claimed:
            return 0, False
        for topic in {m.topic for m in claimed} - self._declared:
            # The service's queue exists before its first command: it waits there for it.
            await self.broker.declare(topic, service_group(topic))
            self._declared.add(topic)
        results = await asyncio.gather(*(self._publish(m) for m in claimed), return_exceptions=True)
        done = [m.id for m, r in zip(claimed, results, strict=True) if r is None]
        if done:
            await self.store.outbox_done(done)
            self.relayed += len(done)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and not done:
            raise errors[0]
        return len(done), len(claimed) == self.batch

    async def _publish(self, message: OutboxMessage) -> None:
        try:
            envelope = Envelope.from_json(message.message)
        except CorruptMessage:
            log.exception("dropping outbox message %s: not an envelope", message.id)
            return
        async with self._slots:
            await self.broker.publish(message.topic, envelope)


def service_group(command: str) -> str:
    """The consumer group of the service a command goes to: ``InventoryService`` for
    ``InventoryService.ReserveItems`` (the group :class:`sagakit.service.Service` uses)."""
    return command.split(".", 1)[0]
