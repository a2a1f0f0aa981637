"""The memory broker's own behaviour (the Broker contract itself is checked for it in
tests/integration/test_broker_contract.py), and the options and names every adapter shares.
No I/O."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sagakit.errors import BrokerError, ConfigurationError
from sagakit.messaging import Envelope, open_broker
from sagakit.messaging.memory import MemoryBroker
from sagakit.messaging.options import Backoff, BrokerOptions, redact, split_options

TOPIC = "InventoryService.ReserveItems"

Opener = Callable[..., Awaitable[MemoryBroker]]


@pytest.fixture
async def opened() -> AsyncIterator[Opener]:
    """Opens connected memory brokers and closes them after the test."""
    made: list[MemoryBroker] = []

    async def open_(url: str | None = None, **options: object) -> MemoryBroker:
        broker = MemoryBroker(url or f"memory://{uuid.uuid4().hex}", **options)  # type: ignore[arg-type]
        made.append(broker)
        await broker.connect()
        return broker

    yield open_
    for broker in made:
        await broker.close()


def name() -> str:
    return f"memory://{uuid.uuid4().hex}"


async def test_open_broker_picks_the_memory_broker() -> None:
    broker = open_broker("memory://orders?prefix=p1&ack_wait=2")
    assert isinstance(broker, MemoryBroker)
    assert broker.options == BrokerOptions(prefix="p1", ack_wait=2.0)
    assert broker.url == "memory://orders?prefix=p1&ack_wait=2"


async def test_brokers_of_one_name_share_queues(opened: Opener) -> None:
    url = name()
    service, orchestrator = await opened(url), await opened(url)
    inbox = service.subscribe(TOPIC, "InventoryService")
    await inbox.start()
    sent = Envelope.new(TOPIC, {"sku": "A-1"})
    await orchestrator.publish(TOPIC, sent)
    delivery = await anext(inbox)
    assert delivery.envelope == sent
    assert delivery.envelope is not sent  # it travelled as JSON bytes
    await delivery.ack()


async def test_other_names_and_prefixes_are_separate(opened: Opener) -> None:
    url = name()
    mine = await opened(url)
    subscription = mine.subscribe(TOPIC, "g")
    await subscription.start()
    await (await opened(name())).publish(TOPIC, Envelope.new(TOPIC))
    await (await opened(url, prefix="other")).publish(TOPIC, Envelope.new(TOPIC))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(subscription), 0.05)


async def test_a_group_outlives_the_broker_that_declared_it(opened: Opener) -> None:
    url = name()
    first = await opened(url)
    await first.declare(TOPIC, "g")
    await first.close()
    second = await opened(url)
    sent = Envelope.new(TOPIC)
    await second.publish(TOPIC, sent)
    third = await opened(url)
    delivery = await anext(third.subscribe(TOPIC, "g"))
    assert delivery.envelope == sent


async def test_ack_wait_runs_out_and_the_message_comes_again(opened: Opener) -> None:
    broker = await opened(ack_wait=0.05)
    subscription = broker.subscribe(TOPIC, "g")
    await subscription.start()
    await broker.publish(TOPIC, Envelope.new(TOPIC))
    first = await anext(subscription)
    second = await asyncio.wait_for(anext(subscription), 1)
    assert (first.redelivered, second.redelivered) == (False, True)
    assert second.envelope == first.envelope
    await second.ack()
    await second.nack()  # settled already: nothing happens
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(subscription), 0.15)


async def test_a_consumer_cancelled_as_it_is_woken_passes_the_message_on(opened: Opener) -> None:
    broker = await opened()
    one, two = broker.subscribe(TOPIC, "g"), broker.subscribe(TOPIC, "g")
    await one.start()
    first = asyncio.ensure_future(anext(one))
    second = asyncio.ensure_future(anext(two))
    await asyncio.sleep(0.01)  # both wait, ``one`` first
    await broker.publish(TOPIC, Envelope.new(TOPIC))  # wakes ``one``...
    first.cancel()  # ...which is cancelled before it takes the message
    delivery = await asyncio.wait_for(second, 1)
    assert delivery.envelope.type == TOPIC
    assert first.cancelled()


async def test_a_message_published_as_a_consumer_starts_to_wait_is_not_missed(
    opened: Opener,
) -> None:
    broker = await opened()
    subscription = broker.subscribe(TOPIC, "g")
    await subscription.start()
    waiting = asyncio.ensure_future(anext(subscription))
    await asyncio.sleep(0)  # it found nothing and is about to wait...
    await broker.publish(TOPIC, Envelope.new(TOPIC))  # ...when the message comes
    delivery = await asyncio.wait_for(waiting, 1)
    assert delivery.envelope.type == TOPIC


async def test_requeued_messages_come_first_in_their_order(opened: Opener) -> None:
    broker = await opened()
    subscription = broker.subscribe(TOPIC, "g")
    await subscription.start()
    sent = [Envelope.new(TOPIC, n) for n in range(4)]
    for envelope in sent:
        await broker.publish(TOPIC, envelope)
    held = [await anext(subscription), await anext(subscription)]
    await subscription.aclose()  # both go back, ahead of the two never delivered
    again = broker.subscribe(TOPIC, "g")
    got = [await anext(again) for _ in range(4)]
    assert [d.envelope.data() for d in got] == [0, 1, 2, 3]
    assert [d.redelivered for d in got] == [True, True, False, False]
    assert all(not d.redelivered for d in held)


# -- options and names shared by every adapter -------------------------------------------------


def test_options_come_from_keywords_or_the_url_and_leave_the_driver_url() -> None:
    url, options = split_options(
        "amqp://u:p@host/vhost?heartbeat=30&prefix=t1&ack_wait=1.5&prefetch=8&timeout=3"
    )
    assert url == "amqp://u:p@host/vhost?heartbeat=30"
    assert options == BrokerOptions(prefix="t1", ack_wait=1.5, prefetch=8, timeout=3.0)
    url, options = split_options("nats://host:4222", prefix="t2", ack_wait=None)
    assert (url, options) == ("nats://host:4222", BrokerOptions(prefix="t2"))
    assert split_options("redis://h?prefix=a", prefix="a")[1].prefix == "a"
    assert BrokerOptions() == BrokerOptions(prefix="sagakit", ack_wait=30.0, prefetch=32)


@pytest.mark.parametrize(
    ("url", "given", "match"),
    [
        ("memory://x?prefix=a", {"prefix": "b"}, "given as 'b' and in the URL as 'a'"),
        ("memory://x?ack_wait=soon", {}, "ack_wait='soon' is invalid"),
        ("memory://x?prefetch=0", {}, "prefetch >= 1"),
        ("memory://x", {"ack_wait": 0}, "ack_wait > 0"),
        ("memory://x?prefix=a.b", {}, "invalid prefix 'a.b'"),
        ("memory://x?prefix=", {}, "invalid prefix ''"),
    ],
)
def test_bad_options_are_configuration_errors(
    url: str, given: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        split_options(url, **given)


def test_passwords_are_redacted() -> None:
    assert redact("amqp://guest:secret@127.0.0.1:5672/") == "amqp://guest:***@127.0.0.1:5672/"
    assert redact("redis://:secret@h:6379/0?prefix=x") == "redis://:***@h:6379/0?prefix=x"
    assert redact("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


async def test_errors_name_the_broker_without_its_password() -> None:
    broker = MemoryBroker("memory://user:secret@x")
    with pytest.raises(BrokerError, match="not connected") as caught:
        await broker.publish(TOPIC, Envelope.new(TOPIC))
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize(
    "topic",
    ["InventoryService.ReserveItems", "sagakit.replies.orders", "OrderCreated", "a-b_c.D9"],
)
async def test_topic_names_that_work_everywhere(opened: Opener, topic: str) -> None:
    broker = await opened()
    await broker.declare(topic, "Group-1_x")
    await broker.publish(topic, Envelope.new(topic))


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = Backoff(first=0.1, cap=1.0)
    delays = [backoff.next() for _ in range(8)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(0 < d <= 1.0 for d in delays)
    assert delays[-1] >= 0.5
    backoff.reset()
    assert backoff.next() <= 0.1
