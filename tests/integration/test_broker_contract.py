"""The Broker contract, written once and run on the memory broker, RabbitMQ, NATS JetStream and
Redis Streams (CONVENTIONS rule 3; the semantics are in sagakit.messaging.base).

Every test gets brokers of its own namespace (a unique ``prefix`` in the URL), deleted after
it. A real broker that is not running skips the test locally and fails it under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from broker_env import (
    GROUP,
    TOPIC,
    URLS,
    Brokers,
    ack_all,
    broker_lock,
    cleanup,
    ids,
    message,
    publish_all,
    quiet,
    require_broker,
    started,
    take,
)

from sagakit.errors import BrokerError, BrokerUnavailable, ConfigurationError
from sagakit.messaging import Broker, Envelope, open_broker

BACKENDS = ["memory", "rabbitmq", "nats", "redis"]


@pytest.fixture(params=BACKENDS)
async def brokers(request: pytest.FixtureRequest) -> AsyncIterator[Brokers]:
    kind = request.param
    require_broker(kind)
    made = Brokers(kind, f"t_{uuid.uuid4().hex[:12]}")
    # The restart tests stop the shared RabbitMQ and NATS; they hold this lock exclusively.
    shared = kind in ("rabbitmq", "nats")
    async with broker_lock(exclusive=False) if shared else contextlib.nullcontext():
        try:
            yield made
        finally:
            for broker in made.made:
                await broker.close()
            if kind != "memory":
                await cleanup(URLS[kind], made.prefix, made.queues())


@pytest.fixture
async def broker(brokers: Brokers) -> Broker:
    return await brokers.open()


# -- delivery ------------------------------------------------------------------------------------


async def test_round_trip_preserves_every_field(broker: Broker) -> None:
    subscription = await started(broker)
    sent = Envelope.new(
        TOPIC,
        {"sku": "A-1", "qty": 2, "price": Decimal("9.99"), "note": "naïve ✓"},
        correlation_id="saga-1",
        causation_id="cmd-0",
        reply_to="sagakit.replies.orders",
        headers={"attempt": "2", "idempotency-key": "saga-1/reserve_items"},
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        tracestate="vendor=opaque",
    )
    await broker.publish(TOPIC, sent)
    [delivery] = await take(subscription)
    assert delivery.envelope == sent
    assert delivery.envelope.data() == {
        "sku": "A-1",
        "qty": 2,
        "price": Decimal("9.99"),
        "note": "naïve ✓",
    }
    assert delivery.redelivered is False
    await delivery.ack()
    await delivery.ack()  # settling twice does nothing
    await quiet(subscription)


async def test_each_group_gets_every_message_in_order(broker: Broker) -> None:
    inventory = await started(broker, group="InventoryService")
    audit = await started(broker, group="audit-log_2")
    sent = await publish_all(broker, 12)
    for subscription in (inventory, audit):
        got = await take(subscription, 12)
        assert ids(got) == sent
        await ack_all(got)
        await quiet(subscription, 0.2)


async def test_topics_are_separate(broker: Broker) -> None:
    reserve = await started(broker, "InventoryService.ReserveItems")
    release = await started(broker, "InventoryService.Release-Items_v2")
    await broker.publish("InventoryService.Release-Items_v2", message(1))
    await broker.publish("InventoryService.ReserveItems", message(2))
    [got] = await take(reserve)
    assert got.envelope.correlation_id == "saga-2"
    [other] = await take(release)
    assert other.envelope.correlation_id == "saga-1"
    await ack_all([got, other])
    await quiet(reserve, 0.2)


async def test_competing_consumers_share_without_duplicates(brokers: Brokers) -> None:
    first, second = await brokers.open(), await brokers.open()
    consumers = [await started(first), await started(second)]
    received: list[list[str]] = [[], []]
    done = asyncio.Event()

    async def consume(k: int) -> None:
        async for delivery in consumers[k]:
            received[k].append(delivery.envelope.message_id)
            await asyncio.sleep(0.01)  # a little work, so the other consumer gets a turn
            await delivery.ack()
            if sum(map(len, received)) >= 20:
                done.set()

    tasks = [asyncio.create_task(consume(k)) for k in (0, 1)]
    sent = await publish_all(first, 20)
    await asyncio.wait_for(done.wait(), 10)
    await asyncio.sleep(0.3)  # nothing more arrives
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    everything = received[0] + received[1]
    assert sorted(everything) == sorted(sent), "each message once, to one of the consumers"
    assert received[0]
    assert received[1]


async def test_a_declared_group_keeps_messages_until_it_subscribes(broker: Broker) -> None:
    await broker.declare(TOPIC, "LateService")
    await broker.declare(TOPIC, "LateService")  # idempotent
    sent = await publish_all(broker, 3)
    subscription = await started(broker, group="LateService")
    got = await take(subscription, 3)
    assert ids(got) == sent
    await ack_all(got)


async def test_messages_wait_for_a_group_whose_consumers_are_gone(brokers: Brokers) -> None:
    service = await brokers.open()
    subscription = await started(service)
    await subscription.aclose()
    await service.close()
    publisher = await brokers.open()
    sent = await publish_all(publisher, 3)
    restarted = await brokers.open()
    got = await take(await started(restarted), 3)
    assert ids(got) == sent
    await ack_all(got)


# -- redelivery ----------------------------------------------------------------------------------


async def test_unacked_message_comes_back_when_its_subscription_closes(broker: Broker) -> None:
    subscription = await started(broker)
    sent = await publish_all(broker, 3)
    held = await take(subscription, 1)
    await subscription.aclose()
    await held[0].ack()  # too late: it was given back; this does nothing
    again = await take(await started(broker), 3)
    assert sorted(ids(again)) == sorted(sent)
    assert next(d for d in again if d.envelope.message_id == sent[0]).redelivered
    await ack_all(again)


async def test_unacked_message_comes_back_when_its_broker_closes(brokers: Brokers) -> None:
    service = await brokers.open()
    subscription = await started(service)
    sent = await publish_all(service, 1)
    [held] = await take(subscription)
    await service.close()  # a service that stops with a message in hand
    replacement = await brokers.open()
    [got] = await take(await started(replacement), timeout=5)
    assert got.envelope == held.envelope
    assert got.envelope.message_id == sent[0]
    assert got.redelivered
    await got.ack()


async def test_nack_requeues_and_nack_without_requeue_drops(broker: Broker) -> None:
    subscription = await started(broker)
    sent = await publish_all(broker, 2)
    [first] = await take(subscription)
    assert first.envelope.message_id == sent[0]
    await first.nack()
    got = await take(subscription, 2, timeout=5)
    again = next(d for d in got if d.envelope.message_id == sent[0])
    assert again.redelivered
    assert sorted(ids(got)) == sorted(sent)
    await again.nack(requeue=False)
    await next(d for d in got if d is not again).ack()
    await quiet(subscription, 0.5 if broker.url.startswith("redis") else 0.3)


async def test_unacked_message_is_delivered_again_after_ack_wait(brokers: Brokers) -> None:
    broker = await brokers.open(ack_wait=0.5)
    subscription = await started(broker)
    sent = await publish_all(broker, 1)
    [first] = await take(subscription)
    assert not first.redelivered
    # Not acked: after ack_wait it comes again (Redis claims idle entries once a second).
    [second] = await take(subscription, timeout=5)
    assert second.envelope.message_id == sent[0]
    assert second.redelivered
    await first.ack()  # the late ack of the expired delivery does no harm
    await second.ack()
    await quiet(subscription, 1.2)  # no third delivery (Redis claims once a second)


async def test_corrupt_messages_are_dropped_and_the_consumer_goes_on(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    subscription = await started(broker)
    raw = getattr(broker, "publish_raw")  # noqa: B009 - not part of the Broker protocol
    await raw(TOPIC, b"\xff not json")
    await raw(TOPIC, b'{"message_id": "x", "type": "T"}')
    await raw(TOPIC, b'["an", "array"]')
    sent = await publish_all(broker, 1)
    with caplog.at_level(logging.WARNING, logger="sagakit.messaging"):
        [delivery] = await take(subscription)
    assert ids([delivery]) == sent
    await delivery.ack()
    dropped = [r for r in caplog.records if "dropped message" in r.getMessage()]
    assert len(dropped) == 3, [r.getMessage() for r in caplog.records]
    assert "missing fields: timestamp" in dropped[1].getMessage()
    await quiet(subscription)


# -- lifecycle -------------------------------------------------------------------------------------


async def test_close_ends_iterators_and_publish_after_close_raises(broker: Broker) -> None:
    subscription = await started(broker)
    consumed: list[str] = []

    async def consume() -> str:
        async for delivery in subscription:
            consumed.append(delivery.envelope.message_id)
            await delivery.ack()
        return "ended"

    task = asyncio.create_task(consume())
    sent = await publish_all(broker, 2)
    async with asyncio.timeout(5):
        while len(consumed) < 2:
            await asyncio.sleep(0.01)
    assert consumed == sent
    await broker.close()
    assert await asyncio.wait_for(task, 3) == "ended"
    await broker.close()  # idempotent
    with pytest.raises(BrokerError, match="closed"):
        await broker.publish(TOPIC, message())
    with pytest.raises(BrokerError, match="closed"):
        await broker.declare(TOPIC, GROUP)
    with pytest.raises(BrokerError, match="closed"):
        await broker.connect()
    assert [d async for d in broker.subscribe(TOPIC, GROUP)] == []


async def test_aclose_ends_one_subscription(broker: Broker) -> None:
    subscription = await started(broker)
    task = asyncio.create_task(anext(subscription, None))
    await asyncio.sleep(0.1)
    await subscription.aclose()
    assert await asyncio.wait_for(task, 3) is None
    await subscription.aclose()
    async with await started(broker) as other:  # the broker itself goes on
        sent = await publish_all(broker, 1)
        assert ids(await take(other)) == sent


async def test_use_before_connect_and_bad_names(brokers: Brokers) -> None:
    broker = open_broker(brokers.url())
    brokers.made.append(broker)
    with pytest.raises(BrokerError, match="not connected"):
        await broker.publish(TOPIC, message())
    with pytest.raises(BrokerError, match="not connected"):
        await anext(broker.subscribe(TOPIC, GROUP))
    await broker.connect()
    await broker.connect()  # idempotent
    for topic in ("", "a..b", ".a", "a.", "a b", "a*", "a>", "a/b", "x" * 201):
        with pytest.raises(ConfigurationError, match="invalid topic"):
            await broker.publish(topic, message())
    for group in ("", "a.b", "a b", "a:b"):
        with pytest.raises(ConfigurationError, match="invalid group"):
            broker.subscribe(TOPIC, group)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_unreachable_broker_raises_broker_unavailable(brokers: Brokers) -> None:
    if brokers.kind == "memory":
        pytest.skip("the memory broker is always reachable")
    scheme = {"rabbitmq": "amqp://guest:secret@", "nats": "nats://", "redis": "redis://"}
    url = f"{scheme[brokers.kind]}127.0.0.1:{_free_port()}?timeout=1"
    broker = open_broker(url)
    with pytest.raises(BrokerUnavailable) as caught:
        await broker.connect()
    assert caught.value.__cause__ is not None
    assert "secret" not in str(caught.value)
    with contextlib.suppress(BrokerError):
        await broker.close()


# -- what one broker does on its own ---------------------------------------------------------------


async def test_redis_forgets_consumers_of_ended_subscriptions(
    brokers: Brokers, monkeypatch: pytest.MonkeyPatch
) -> None:
    if brokers.kind != "redis":
        pytest.skip("Redis consumers are per subscription; the other brokers keep none")
    import sagakit.messaging.redis as redis_adapter

    monkeypatch.setattr(redis_adapter, "DEAD_AFTER", 0.0)  # "unseen for long": 10 x ack_wait
    broker = await brokers.open(ack_wait=0.05)
    ended, holder = await started(broker), await started(broker)
    await publish_all(broker, 2)
    await ack_all(await take(ended))
    await take(holder)  # held, never acked
    await ended.aclose()
    await asyncio.sleep(0.6)
    client = getattr(broker, "_redis")  # noqa: B009
    key = f"{brokers.prefix}:{TOPIC}"
    before = {c["name"] for c in await client.xinfo_consumers(key, GROUP)}
    await started(broker)  # a new subscription tidies up
    after = {c["name"] for c in await client.xinfo_consumers(key, GROUP)}
    assert len(before) == 2
    assert after == before - {getattr(ended, "_consumer").encode()}  # noqa: B009


async def test_rabbitmq_refusal_is_a_broker_error_not_unavailable(brokers: Brokers) -> None:
    if brokers.kind != "rabbitmq":
        pytest.skip("RabbitMQ-specific")
    import aio_pika

    broker = await brokers.open()
    name = getattr(broker, "queue_name")(TOPIC, "Clash")  # noqa: B009
    connection = await aio_pika.connect(URLS["rabbitmq"])
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments={"x-max-length": 5})
    with pytest.raises(BrokerError) as caught:
        await broker.declare(TOPIC, "Clash")
    assert not isinstance(caught.value, BrokerUnavailable)
    assert "PRECONDITION_FAILED" in str(caught.value)
    await broker.publish(TOPIC, message())  # the broker goes on


async def test_an_abandoned_subscription_keeps_nothing_past_ack_wait(brokers: Brokers) -> None:
    # A consumer that stops iterating without aclose() (a crashed loop that subscribes again)
    # must not sit on messages: they reach a live consumer after about ack_wait.
    abandoned_broker = await brokers.open(ack_wait=0.5)
    live_broker = await brokers.open(ack_wait=0.5)
    abandoned, live = await started(abandoned_broker), await started(live_broker)
    sent = await publish_all(live_broker, 6)
    await take(abandoned, 1)  # then never iterated again, never closed
    got: set[str] = set()
    async with asyncio.timeout(8):
        while got != set(sent):
            delivery = await anext(live)
            got.add(delivery.envelope.message_id)
            await delivery.ack()
