"""The reply consumer: stores the replies of remote steps, then acks them.

Every orchestrator worker of a database consumes the App's reply topic in one consumer group.
A reply is stored as a signal of its saga named ``sagakit.reply.<command id>`` (its message id
is the signal id, so a duplicate delivery is stored once), which wakes the saga waiting for it.
Only then is it acked: a worker that dies before gets it delivered again. A reply for a saga
that has ended is journaled as ignored; one for a saga this database does not have is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from sagakit.codec import encode
from sagakit.errors import InvalidSagaState, SagaNotFound, StoreError
from sagakit.journal import Entry, Kind
from sagakit.messaging.base import Broker, Delivery
from sagakit.remote import COMPLETED, FAILED, REPLY_SIGNAL
from sagakit.store.base import SagaRecord, Store

log = logging.getLogger("sagakit.replies")
GROUP = "sagakit-orchestrator"


class ReplyConsumer:
    """Consumes ``topic`` (in group :data:`GROUP`) and stores each reply; see the module."""

    def __init__(
        self,
        store: Store,
        broker: Broker,
        topic: str,
        *,
        on_reply: Callable[[], None] | None = None,
        concurrency: int = 16,
    ) -> None:
        self.store = store
        # Replies stored at once: each is a database transaction, and one at a time a worker
        # with many sagas in flight waits on its replies rather than on its steps.
        self.concurrency = concurrency
        # This process's runner: a stored reply makes its saga claimable; on SQLite nothing
        # else would tell the runner before its next poll.
        self.on_reply = on_reply or (lambda: None)
        self.broker = broker
        self.topic = topic
        self.stored = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="sagakit-replies")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        backoff = 0.1
        while True:
            deliveries = self.broker.subscribe(self.topic, GROUP)
            handling: set[asyncio.Task[None]] = set()
            try:
                async for delivery in deliveries:
                    while len(handling) >= self.concurrency:
                        done, handling = await asyncio.wait(
                            handling, return_when=asyncio.FIRST_COMPLETED
                        )
                        for task in done:
                            task.result()  # a store that failed: subscribe again
                    handling.add(asyncio.create_task(self.handle(delivery)))
                    backoff = 0.1
                await _finish(handling)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker or the store went away: subscribe again
                log.warning("consuming replies on %s failed (%s); retrying", self.topic, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                for task in handling:  # unacked, their replies are delivered again
                    task.cancel()
                # Give back what it holds now, not after ack_wait.
                aclose = getattr(deliveries, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()

    async def handle(self, delivery: Delivery) -> None:
        env = delivery.envelope
        if env.type not in (COMPLETED, FAILED) or not env.correlation_id or not env.causation_id:
            log.warning("dropping message %s on the reply topic: not a reply", env.message_id)
            await delivery.ack()
            return
        stored = encode({"type": env.type, "payload": env.payload})
        name = REPLY_SIGNAL + env.causation_id
        try:
            await self.store.send_signal(env.correlation_id, env.message_id, name, stored,
                                         time.time())  # fmt: skip
            self.stored += 1
            self.on_reply()
        except SagaNotFound:
            log.info("dropping reply %s: saga %s is not in this database",
                     env.message_id, env.correlation_id)  # fmt: skip
        except InvalidSagaState:
            await self._journal_late(env.correlation_id, env.message_id, env.causation_id)
        except StoreError:
            await delivery.nack()  # delivered again once the database answers
            raise
        await delivery.ack()

    async def _journal_late(self, saga_id: str, reply_id: str, command_id: str) -> None:
        """Record in an ended saga's journal that a reply came after its end (once)."""

        def decide(record: SagaRecord, journal: list[Entry]) -> list[Entry]:
            if any((e.data or {}).get("signal_id") == reply_id for e in journal):
                raise InvalidSagaState(saga_id, record.state, "journal a reply for", "open")
            data = {"signal_id": reply_id, "command": command_id,
                    "reason": "it came after the saga ended"}  # fmt: skip
            index = journal[-1].index + 1
            return [Entry(saga_id=saga_id, index=index, kind=Kind.REPLY_IGNORED, at=time.time(),
                          data=data)]  # fmt: skip

        with contextlib.suppress(InvalidSagaState):
            await self.store.append_checked(saga_id, decide)


async def _finish(tasks: set[asyncio.Task[None]]) -> None:
    """Wait for ``tasks``; raise the first failure among them."""
    for task in asyncio.as_completed(tasks):
        await task
