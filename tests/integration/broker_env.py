"""The real brokers the broker tests use: where they are, whether they answer, how to clean up
after a test, a lock so a test that restarts a shared broker runs alone, and small helpers to
subscribe, publish and take messages.

URLs come from ``SAGAKIT_TEST_AMQP``, ``SAGAKIT_TEST_NATS`` and ``SAGAKIT_TEST_REDIS``, with
the loopback servers of the development machines as defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlencode, urlsplit, urlunsplit

import pytest

from sagakit.examples.runner import delete_namespace
from sagakit.messaging import Broker, Delivery, Envelope, open_broker
from sagakit.messaging.subscription import Subscription

URLS = {
    "rabbitmq": os.environ.get("SAGAKIT_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/"),
    "nats": os.environ.get("SAGAKIT_TEST_NATS", "nats://127.0.0.1:4222"),
    "redis": os.environ.get("SAGAKIT_TEST_REDIS", "redis://127.0.0.1:6379/0"),
}
DEFAULT_PORTS = {"rabbitmq": 5672, "nats": 4222, "redis": 6379}
LOCK_PATH = "/tmp/sagakit-broker-tests.lock"
TOPIC = "InventoryService.ReserveItems"
GROUP = "InventoryService"


def address(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def unreachable(kind: str, url: str | None = None) -> str | None:
    """None if the broker's port answers, else why not."""
    host, port = address(url or URLS[kind], DEFAULT_PORTS[kind])
    try:
        with socket.create_connection((host, port), timeout=1):
            return None
    except OSError as exc:
        return f"{kind} is not reachable at {host}:{port} ({exc})"


def absent(reason: str) -> NoReturn:
    """Skip (locally) or fail (in CI, CI=true): something a test needs is missing."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must provide it (see .ci/run)")
    pytest.skip(reason)


def require_broker(kind: str) -> None:
    """Skip (locally) or fail (in CI) when the broker is not running."""
    if kind == "memory":
        return
    reason = unreachable(kind)
    if reason is not None:
        absent(reason)


def with_options(url: str, **options: object) -> str:
    """``url`` with sagakit broker options added to its query."""
    parts = urlsplit(url)
    extra = urlencode({k: str(v) for k, v in options.items()})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


@contextlib.asynccontextmanager
async def broker_lock(*, exclusive: bool) -> AsyncIterator[None]:
    """Shared by tests that use the shared brokers, exclusive for one that restarts them,
    across pytest processes on this machine."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


async def cleanup(url: str, prefix: str, queues: Iterable[str] = ()) -> None:
    """Delete what the brokers of a test made under ``prefix``."""
    await delete_namespace(url, prefix, queues)


# -- opening brokers, publishing and taking messages --------------------------------------------


@dataclass
class Brokers:
    """Opens brokers of one test's namespace; all of them are closed and cleaned up after."""

    kind: str
    prefix: str
    made: list[Broker] = field(default_factory=list)

    def url(self, **options: Any) -> str:
        base = f"memory://{self.prefix}" if self.kind == "memory" else URLS[self.kind]
        return with_options(base, prefix=self.prefix, **options)

    async def open(self, **options: Any) -> Broker:
        broker = open_broker(self.url(**options))
        self.made.append(broker)
        await broker.connect()
        return broker

    def queues(self) -> set[str]:
        return {q for b in self.made for q in getattr(b, "declared_queues", ())}


async def started(broker: Broker, topic: str = TOPIC, group: str = GROUP) -> Subscription:
    """A subscription whose group exists on the broker (so it gets what is published next)."""
    subscription = broker.subscribe(topic, group)
    assert isinstance(subscription, Subscription)
    await subscription.start()
    return subscription


async def take(subscription: Subscription, n: int = 1, timeout: float = 5.0) -> list[Delivery]:
    got: list[Delivery] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            got.append(await anext(subscription))
    return got


async def quiet(subscription: Subscription, within: float = 0.25) -> None:
    """Nothing (more) is delivered within ``within`` seconds."""
    try:
        delivery = await asyncio.wait_for(anext(subscription), within)
    except TimeoutError:
        return
    pytest.fail(f"unexpected delivery of {delivery.envelope}")


def message(n: int = 0, **fields: Any) -> Envelope:
    return Envelope.new(TOPIC, {"n": n}, correlation_id=f"saga-{n}", **fields)


async def publish_all(broker: Broker, count: int, topic: str = TOPIC) -> list[str]:
    sent = [message(n) for n in range(count)]
    for envelope in sent:
        await broker.publish(topic, envelope)
    return [e.message_id for e in sent]


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.envelope.message_id for d in deliveries]


async def ack_all(deliveries: list[Delivery]) -> None:
    for delivery in deliveries:
        await delivery.ack()
