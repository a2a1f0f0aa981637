"""Redis Streams (redis-py asyncio): the Broker contract on one stream per topic.

Names: a topic is the stream key ``<prefix>:<topic>`` (entries with one field ``m``, the
envelope's JSON); a group is a consumer group of that stream, created with ``$`` (it receives
entries added after it was created); each subscription is a consumer of the group named
``<host>-<pid>-<random>``.

Delivery: ``XREADGROUP >`` in batches of ``prefetch``; ``ack`` and ``nack(requeue=False)`` are
``XACK`` (entries are not deleted: other groups may still need them; trim streams with
``XTRIM MINID`` as operations see fit). ``nack(requeue=True)`` and a closing subscription hand
entries to the consumer ``sagakit-returned`` with a large idle time, and every subscription
first takes over (``XAUTOCLAIM``) entries idle for longer than ``ack_wait``, so given-back
entries come again at the next read and those of a dead consumer after ``ack_wait``.

Durability: ``publish`` returns after ``XADD``; entries survive a Redis restart only when Redis
persists them: run it with ``appendonly yes`` (``appendfsync always`` to lose nothing
acknowledged, ``everysec`` to risk up to a second). Without persistence a restart loses the
streams and groups; subscriptions then create their group again and go on.

Reconnection: every command reconnects; a subscription whose read fails backs off and retries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sagakit.errors import BrokerError, BrokerUnavailable
from sagakit.messaging.common import BrokerBase
from sagakit.messaging.options import Backoff, BrokerOptions
from sagakit.messaging.subscription import Incoming, Outcome, Settle, Subscription

__all__ = ["RedisBroker"]

log = logging.getLogger("sagakit.messaging.redis")

FIELD = b"m"
RETURNED = "sagakit-returned"  # owner of given-back entries until a live consumer claims them
RETURNED_IDLE_MS = 365 * 24 * 3600 * 1000
DEAD_AFTER = 3600.0  # seconds unseen after which an empty consumer is deleted
READ_BLOCK = 1.0  # seconds one XREADGROUP waits; also how often idle entries are claimed
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
_FAILED = (*_UNAVAILABLE, RedisError)


def translate(exc: BaseException, where: str) -> BrokerError:
    """The sagakit error for a redis-py error (raise it ``from exc``)."""
    if isinstance(exc, AuthenticationError):
        return BrokerError(f"Redis {where} refused the credentials: {exc}")
    if isinstance(exc, _UNAVAILABLE):
        return BrokerUnavailable(where, f"{type(exc).__name__}: {exc}")
    return BrokerError(f"Redis {where} refused: {type(exc).__name__}: {exc}")


class RedisBroker(BrokerBase):
    """The broker of ``redis://host:6379/0``.

    Args:
        url: the Redis URL; ``?prefix=...&ack_wait=...&prefetch=...&timeout=...`` are read
            here, other query parameters go to redis-py.
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
        self._redis: Redis | None = None

    def key(self, topic: str) -> str:
        return f"{self.options.prefix}:{topic}"

    async def _connect(self) -> None:
        self._redis = Redis.from_url(
            self._driver_url,
            socket_connect_timeout=self.options.timeout,
            socket_timeout=self.options.timeout + READ_BLOCK,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            client_name=f"sagakit-{self.options.prefix}",
        )
        try:
            await self._redis.ping()
        except _FAILED as exc:
            await self._disconnect()
            raise translate(exc, self.where) from exc

    async def _disconnect(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

    async def _publish(self, topic: str, body: bytes, message_id: str) -> None:
        assert self._redis is not None
        try:
            await self._redis.xadd(self.key(topic), {FIELD: body})
        except _FAILED as exc:
            raise translate(exc, self.where) from exc

    async def _declare(self, topic: str, group: str) -> None:
        assert self._redis is not None
        try:
            await create_group(self._redis, self.key(topic), group)
        except _FAILED as exc:
            raise translate(exc, self.where) from exc

    def _subscription(self, topic: str, group: str) -> Subscription:
        assert self._redis is not None
        return _RedisSubscription(topic, group, self.options, self.where, self._redis)


async def create_group(client: Redis, key: str, group: str) -> None:
    """Create ``group`` on stream ``key`` (and the stream) unless it exists."""
    try:
        await client.xgroup_create(key, group, id="$", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class _RedisSubscription(Subscription):
    def __init__(
        self, topic: str, group: str, options: BrokerOptions, url: str, client: Redis
    ) -> None:
        super().__init__(topic, group, options, url)
        self._redis = client
        self._key = f"{options.prefix}:{topic}"
        self._consumer = consumer_name()
        self._buffer: deque[tuple[float, bytes, Any, bool]] = deque()
        self._claim_from = "0-0"
        self._claimed_at = 0.0  # monotonic time of the last XAUTOCLAIM; 0 = claim now
        self._backoff = Backoff()
        self._reading: asyncio.Future[None] | None = None

    async def _open(self) -> None:
        try:
            await create_group(self._redis, self._key, self.group)
            await self._forget_dead_consumers()
        except _FAILED as exc:
            raise translate(exc, self.url) from exc

    async def _forget_dead_consumers(self) -> None:
        """Delete consumers of the group that hold nothing and were not seen for long (those of
        processes that ended); each subscription makes a new one. One holding entries stays
        until they are claimed: deleting it would drop them from the group."""
        idle_ms = max(DEAD_AFTER, 10 * self.options.ack_wait) * 1000
        consumers: Any = await self._redis.xinfo_consumers(self._key, self.group)
        for consumer in consumers:
            if consumer["pending"] == 0 and consumer["idle"] > idle_ms:
                await self._redis.xgroup_delconsumer(self._key, self.group, consumer["name"])

    def _take(self) -> Incoming | None:
        while self._buffer:
            fetched, entry_id, fields, redelivered = self._buffer.popleft()
            if time.monotonic() - fetched > self.options.ack_wait:
                continue  # idle past ack_wait: any consumer may claim it now
            body = fields.get(FIELD, b"") if isinstance(fields, dict) else b""
            return Incoming(
                body=body,
                received=fetched,
                redelivered=redelivered,
                settle=self._settler(entry_id),
                ident=f"{self._key} {entry_id.decode()}",
            )
        return None

    async def _fill(self) -> None:
        # A read interrupted by a cancelled __anext__ goes on in the background, and what it
        # reads lands in the buffer: cancelling a blocked XREADGROUP would leave the entries
        # Redis had already given this consumer invisible until ack_wait runs out.
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        try:
            await asyncio.shield(self._reading)
        except asyncio.CancelledError:
            raise  # the read goes on; the next call waits for it
        except BaseException:
            self._reading = None
            raise
        self._reading = None

    async def _read(self) -> None:
        try:
            if time.monotonic() - self._claimed_at >= READ_BLOCK and await self._claim():
                return
            reply: Any = await self._redis.xreadgroup(
                self.group,
                self._consumer,
                {self._key: ">"},
                count=self.options.prefetch,
                block=int(READ_BLOCK * 1000),
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise translate(exc, self.url) from exc
            # The stream or group is gone (a Redis restart without persistence): recreate it.
            log.warning("Redis group %s of %s is gone; creating it again", self.group, self._key)
            await self._pause_on_error(create_group(self._redis, self._key, self.group))
            return
        except _UNAVAILABLE as exc:
            log.debug("reading %s: %s: %s", self._key, type(exc).__name__, exc)
            await asyncio.sleep(self._backoff.next())
            return
        self._backoff.reset()
        now = time.monotonic()
        for _key, entries in reply or []:
            self._buffer.extend((now, entry_id, fields, False) for entry_id, fields in entries)

    async def _claim(self) -> bool:
        """Take over entries idle past ``ack_wait``; True if there were any."""
        reply: Any = await self._redis.xautoclaim(
            self._key,
            self.group,
            self._consumer,
            min_idle_time=int(self.options.ack_wait * 1000),
            start_id=self._claim_from,
            count=self.options.prefetch,
        )
        next_id, entries = reply[0], reply[1]
        self._claim_from = next_id.decode() if isinstance(next_id, bytes) else str(next_id)
        if self._claim_from == "0-0":
            self._claimed_at = time.monotonic()  # scanned to the end; rest until the next poll
        now = time.monotonic()
        self._buffer.extend((now, entry_id, fields, True) for entry_id, fields in entries)
        return bool(entries)

    async def _pause_on_error(self, work: Awaitable[None]) -> None:
        try:
            await work
        except _FAILED as exc:
            log.debug("%s: %s", self._key, exc)
            await asyncio.sleep(self._backoff.next())

    def _settler(self, entry_id: bytes) -> Settle:
        async def settle(outcome: Outcome) -> None:
            if outcome is Outcome.REQUEUE:
                await self._give_back([entry_id])
            else:
                await self._redis.xack(self._key, self.group, entry_id)

        return settle

    async def _give_back(self, entry_ids: list[Any]) -> None:
        await self._redis.xclaim(
            self._key,
            self.group,
            RETURNED,
            min_idle_time=0,
            message_ids=entry_ids,
            idle=RETURNED_IDLE_MS,
            justid=True,
        )
        self._claimed_at, self._claim_from = 0.0, "0-0"

    async def _release(self, unsettled: list[Incoming]) -> None:
        reading, self._reading = self._reading, None
        if reading is not None:
            reading.cancel()
            await asyncio.wait({reading})
            if not reading.cancelled() and reading.exception() is not None:
                log.debug("the last read of %s failed: %r", self._key, reading.exception())
        self._buffer.clear()
        try:
            # What this consumer still owns: unacked deliveries, the buffer (but not what another
            # consumer claimed meanwhile), and entries of a read that close() interrupted.
            pending: Any = await self._redis.xpending_range(
                self._key, self.group, min="-", max="+", count=10_000, consumername=self._consumer
            )
            ids = [p["message_id"] for p in pending]
            if ids:
                await self._give_back(ids)
        except (*_UNAVAILABLE, RedisError) as exc:
            log.debug("giving back the entries of %s: %s", self._consumer, exc)
