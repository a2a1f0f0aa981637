"""Choreography end to end: services as EventBus handlers, each event handled once through its
service's inbox, and the tracker that correlates a flow's events into one saga journal and
parks a flow that stalls. On the memory broker and on RabbitMQ, NATS and Redis (skipped
locally, failed under CI=true when absent), each test in a broker namespace of its own; with a
worker App running on the same database, which must never touch the tracked sagas."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from broker_env import URLS, broker_lock, cleanup, require_broker, with_options

from sagakit import App
from sagakit.choreography import EventBus, EventContext
from sagakit.inbox import Inbox
from sagakit.journal import Entry, Kind, SagaState
from sagakit.messaging import Broker, Envelope, open_broker
from sagakit.tracker import Tracker

STEPS = [
    "ReserveInventory",
    "InventoryReserved",
    "ProcessPayment",
    "PaymentProcessed",
    "CreateShipment",
    "ShipmentCreated",
]
HAPPY = ["OrderCreated", *STEPS, "OrderFulfilled"]
NO_INBOX = "sqlite:///never-opened.db"  # a bus without handlers opens no inbox
COMPENSATED = ["OrderCreated", *STEPS[:3], "PaymentFailed", "ReleaseInventory", "InventoryReleased"]


@dataclass
class Brokers:
    """Brokers of one test's namespace, connected; closed and cleaned up after the test."""

    kind: str
    prefix: str
    made: list[Broker] = field(default_factory=list)

    @property
    def url(self) -> str:
        base = f"memory://{self.prefix}" if self.kind == "memory" else URLS[self.kind]
        return with_options(base, prefix=self.prefix)

    async def open(self) -> Broker:
        broker = open_broker(self.url)
        self.made.append(broker)
        await broker.connect()
        return broker


@pytest.fixture(params=["memory", "rabbitmq", "nats", "redis"])
async def brokers(request: pytest.FixtureRequest) -> AsyncIterator[Brokers]:
    kind = request.param
    require_broker(kind)
    made = Brokers(kind, f"t{uuid.uuid4().hex[:12]}")
    async with broker_lock(exclusive=False):
        try:
            yield made
        finally:
            for broker in made.made:
                await broker.close()
            if kind != "memory":
                queues = {q for b in made.made for q in getattr(b, "declared_queues", ())}
                await cleanup(URLS[kind], made.prefix, queues)


@pytest.fixture
def memory() -> Brokers:
    return Brokers("memory", f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
def saga_type() -> str:
    return f"OrderChoreography{uuid.uuid4().hex[:6]}"


# -- the seed's order flow, as four services --------------------------------------------------


@dataclass
class Shop:
    """The services of the order flow, and what their handlers did."""

    buses: list[EventBus] = field(default_factory=list)
    runs: dict[str, int] = field(default_factory=dict)

    def ran(self, name: str) -> None:
        self.runs[name] = self.runs.get(name, 0) + 1


async def open_shop(
    brokers: Brokers, tmp_path: Path, *, card_limit: int = 1000, payment: bool = True
) -> Shop:
    """orders, inventory, payment (unless ``payment`` is False: it never answers) and
    shipping, each with its own broker connection and inbox."""
    shop = Shop()

    async def bus(service: str) -> EventBus:
        instance = EventBus(await brokers.open(), service=service, retry_delay=0.05,
                            inbox=f"sqlite:///{tmp_path / f'{service}-inbox.db'}")  # fmt: skip
        shop.buses.append(instance)
        return instance

    orders, inventory, pay, shipping = [
        await bus(s) for s in ("orders", "inventory", "payment", "shipping")
    ]

    def relay(source: str, target: str) -> None:
        """The seed's order service: each event of the flow asks for the next step."""

        @orders.on(source)
        async def forward(event: EventContext, data: dict[str, Any]) -> None:
            shop.ran(f"orders.{source}")
            event.publish(target, data)

    relay("OrderCreated", "ReserveInventory")
    relay("InventoryReserved", "ProcessPayment")
    relay("PaymentProcessed", "CreateShipment")
    relay("ShipmentCreated", "OrderFulfilled")

    @orders.on("PaymentFailed")
    async def payment_failed(event: EventContext, data: dict[str, Any]) -> None:
        shop.ran("orders.PaymentFailed")
        event.publish("ReleaseInventory", {"reservation_id": data["reservation_id"]})
        event.publish("OrderFailed", {"order_id": data["order_id"], "reason": "Payment failed"})

    @inventory.on("ReserveInventory")
    def reserve(event: EventContext, data: dict[str, Any]) -> None:  # sync: runs in a thread
        shop.ran("inventory.ReserveInventory")
        db: sqlite3.Connection = event.db
        db.execute("CREATE TABLE IF NOT EXISTS reservations (id TEXT PRIMARY KEY, order_id TEXT)")
        db.execute("INSERT INTO reservations VALUES (?, ?)", (event.message_id, data["order_id"]))
        event.publish("InventoryReserved", {**data, "reservation_id": event.message_id})

    @inventory.on("ReleaseInventory")
    def release(event: EventContext, data: dict[str, Any]) -> None:
        shop.ran("inventory.ReleaseInventory")
        event.db.execute("DELETE FROM reservations WHERE id = ?", (data["reservation_id"],))
        event.publish("InventoryReleased", data)

    if payment:

        @pay.on("ProcessPayment")
        async def charge(event: EventContext, data: dict[str, Any]) -> None:
            shop.ran("payment.ProcessPayment")
            if data["total"] > card_limit:
                event.publish("PaymentFailed", {**data, "reason": "card declined"})
            else:
                event.publish("PaymentProcessed", {**data, "payment_id": f"p-{data['order_id']}"})

    @shipping.on("CreateShipment")
    async def ship(event: EventContext, data: dict[str, Any]) -> None:
        shop.ran("shipping.CreateShipment")
        event.publish("ShipmentCreated", {**data, "tracking_number": "TRACK-1"})

    for instance in shop.buses:
        await instance.start()
    return shop


async def close_shop(shop: Shop) -> None:
    for instance in shop.buses:
        await instance.close()


def order_tracker(db_url: str, broker: Broker, saga_type: str, **kw: Any) -> Tracker:
    options: dict[str, Any] = {"deadline": 30.0, "check_interval": 0.1, "retry_delay": 0.05}
    return Tracker(
        db_url,
        broker,
        saga_type=saga_type,
        starts="OrderCreated",
        steps=STEPS,
        completes=["OrderFulfilled"],
        fails=["PaymentFailed"],
        compensations={"InventoryReserved": "InventoryReleased"},
        events=["ReleaseInventory"],
        **{**options, **kw},
    )


async def settled(reader: App, saga_id: str, states: set[SagaState], timeout: float = 15.0) -> Any:
    """The saga once it is in one of ``states`` (and its journal has stopped growing)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                info = await reader.get(saga_id)
            except Exception:  # not created yet
                info = None
            if info is not None and info.state in states:
                return info
            await asyncio.sleep(0.02)


def events_of(journal: list[Entry]) -> list[dict[str, Any]]:
    return [e.data or {} for e in journal if e.kind is Kind.EVENT_RECORDED]


TRACKER_KINDS = {Kind.SAGA_STARTED, Kind.EVENT_RECORDED, Kind.SAGA_COMPENSATING,
                 Kind.SAGA_FAILED, Kind.SAGA_COMPLETED}  # fmt: skip


def check_causal_chain(journal: list[Entry], first: Envelope) -> None:
    """Every recorded event but the first was caused by another recorded event."""
    recorded = events_of(journal)
    ids = {d["message_id"] for d in recorded}
    assert len(ids) == len(recorded), "an event was recorded twice"
    for d in recorded:
        if d["message_id"] == first.message_id:
            assert d["causation_id"] is None
        else:
            assert d["causation_id"] in ids, d


async def run_flow(  # noqa: PLR0917 - the tests read better with positional arguments
    brokers: Brokers,
    tmp_path: Path,
    db_url: str,
    saga_type: str,
    total: int,
    states: set[SagaState],
) -> tuple[Any, list[Entry], Envelope, Shop]:
    worker = App(db_url, poll_interval=0.05)  # executes sagas; must leave the tracked ones alone
    await worker.open()
    assert worker.executing
    tracker = order_tracker(db_url, await brokers.open(), saga_type)
    await tracker.start()
    shop = await open_shop(brokers, tmp_path)
    try:
        order = {"order_id": "o-1", "items": ["book"], "total": total}
        client = EventBus(await brokers.open(), service="storefront", inbox=NO_INBOX)
        first = await client.publish("OrderCreated", order)
        assert first.correlation_id is not None
        info = await settled(worker, first.correlation_id, states)
        await asyncio.sleep(0.3)  # late events (OrderFailed is untracked) have their chance
        journal = await worker.journal(info.id)
        return await worker.get(info.id), journal, first, shop
    finally:
        await close_shop(shop)
        await tracker.close()
        await worker.close()


async def test_a_completed_flow_is_one_saga(brokers: Brokers, tmp_path: Path, db_url: str,
                                            saga_type: str) -> None:  # fmt: skip
    info, journal, first, shop = await run_flow(
        brokers, tmp_path, db_url, saga_type, 50, {SagaState.COMPLETED}
    )
    assert info.id == first.correlation_id
    assert info.saga_type == saga_type
    assert info.idempotency_key == first.correlation_id
    assert info.input == {"order_id": "o-1", "items": ["book"], "total": 50}
    assert info.output == {"order_id": "o-1", "items": ["book"], "total": 50,
                           "reservation_id": info.output["reservation_id"],
                           "payment_id": "p-o-1", "tracking_number": "TRACK-1"}  # fmt: skip
    assert sorted(d["event"] for d in events_of(journal)) == sorted(HAPPY)
    assert journal[0].kind is Kind.SAGA_STARTED
    assert journal[-1].kind is Kind.SAGA_COMPLETED
    assert [e.index for e in journal] == list(range(len(journal)))
    check_causal_chain(journal, first)
    assert {e.kind for e in journal} <= TRACKER_KINDS  # the worker never ran it
    assert not info.waiting
    services = {d["event"]: d["service"] for d in events_of(journal)}
    assert services["InventoryReserved"] == "inventory"
    assert services["OrderCreated"] == "storefront"
    assert all(n == 1 for n in shop.runs.values()), shop.runs


async def test_a_failed_payment_is_compensated(brokers: Brokers, tmp_path: Path, db_url: str,
                                               saga_type: str) -> None:  # fmt: skip
    info, journal, first, shop = await run_flow(
        brokers, tmp_path, db_url, saga_type, 5000, {SagaState.FAILED}
    )
    assert sorted(d["event"] for d in events_of(journal)) == sorted(COMPENSATED)
    assert journal[-1].kind is Kind.SAGA_FAILED
    assert info.error is not None
    assert info.error["type"] == "PaymentFailed"
    check_causal_chain(journal, first)
    assert {e.kind for e in journal} <= TRACKER_KINDS
    assert shop.runs["inventory.ReleaseInventory"] == 1
    inventory_db = sqlite3.connect(tmp_path / "inventory-inbox.db")
    try:
        assert inventory_db.execute("SELECT count(*) FROM reservations").fetchone() == (0,)
    finally:
        inventory_db.close()


# -- the event bus: once per service, the same events again -----------------------------------


async def collect(broker: Broker, topic: str, group: str) -> tuple[list[str], asyncio.Task[None]]:
    """Message ids delivered to ``group`` on ``topic``, as they come."""
    seen: list[str] = []
    subscription = broker.subscribe(topic, group)
    await subscription.start()  # type: ignore[attr-defined]

    async def pump() -> None:
        async for delivery in subscription:
            seen.append(delivery.envelope.message_id)
            await delivery.ack()

    return seen, asyncio.create_task(pump())


async def test_a_duplicate_runs_the_handler_once_and_sends_the_same_events(
    brokers: Brokers, tmp_path: Path
) -> None:
    inbox = f"sqlite:///{tmp_path / 'inventory-inbox.db'}"
    runs: list[str] = []
    observer = await brokers.open()
    seen, pump = await collect(observer, "InventoryReserved", "observer")

    def inventory(broker: Broker) -> EventBus:
        bus = EventBus(broker, service="inventory", inbox=inbox, retry_delay=0.05)

        @bus.on("ReserveInventory")
        async def reserve(event: EventContext, data: dict[str, Any]) -> None:
            runs.append(event.message_id)
            event.publish("InventoryReserved", {"order_id": data["order_id"]})
            event.publish("InventoryReserved", {"order_id": data["order_id"], "again": True})

        return bus

    command = Envelope.new("ReserveInventory", {"order_id": "o-9"}, correlation_id="o-9")
    sender = await brokers.open()
    copies = 1 if brokers.kind == "nats" else 2  # JetStream drops a repeated Nats-Msg-Id
    try:
        async with inventory(await brokers.open()):
            await sender.publish("ReserveInventory", command)
            await sender.publish("ReserveInventory", command)
            async with asyncio.timeout(10):
                while len(seen) < 2 * copies:
                    await asyncio.sleep(0.02)
        first_ids = list(dict.fromkeys(seen))
        # A new process of the service gets the event once more: it runs nothing, it sends
        # the stored events again, with their ids.
        async with inventory(await brokers.open()):
            await sender.publish("ReserveInventory", command)
            async with asyncio.timeout(10):
                while len(seen) < 2 * copies + 2 and brokers.kind != "nats":
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
    finally:
        pump.cancel()
    assert runs == [command.message_id]
    assert len(first_ids) == 2
    assert set(seen) == set(first_ids)
    if brokers.kind != "nats":
        assert seen.count(first_ids[0]) == 3
        assert seen.count(first_ids[1]) == 3


async def test_a_failing_handler_is_retried_then_given_up(memory: Brokers, tmp_path: Path) -> None:
    observer = await memory.open()
    seen, pump = await collect(observer, "Done", "observer")
    tries: list[int] = []
    bus = EventBus(await memory.open(), service="flaky", retry_delay=0.01, max_attempts=3,
                   inbox=f"sqlite:///{tmp_path / 'flaky.db'}")  # fmt: skip

    @bus.on("Work")
    async def work(event: EventContext, data: dict[str, Any]) -> None:
        tries.append(data["n"])
        event.publish("Done", data)
        if (data["n"] == 1 and tries.count(1) < 3) or data["n"] == 2:
            raise RuntimeError("not now")

    try:
        async with bus:
            await bus.publish("Work", {"n": 1})  # succeeds on the third try
            await bus.publish("Work", {"n": 2})  # always fails: given up after three
            async with asyncio.timeout(10):
                while tries.count(1) < 3 or tries.count(2) < 3 or not seen:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
    finally:
        pump.cancel()
    assert tries.count(1) == 3
    assert tries.count(2) == 3
    assert len(seen) == 1  # only the success published, once


@dataclass(frozen=True)
class Order:
    order_id: str
    total: int


async def test_an_event_that_cannot_be_read_is_given_up_at_once(
    memory: Brokers, tmp_path: Path
) -> None:
    ran: list[Order] = []
    inbox = Inbox(f"sqlite:///{tmp_path / 'typed.db'}")
    bus = EventBus(await memory.open(), service="typed", inbox=inbox, retry_delay=5)

    @bus.on("OrderCreated", input_type=Order)
    async def created(event: EventContext, order: Order) -> None:
        ran.append(order)

    async with inbox, bus:
        good = await bus.publish("OrderCreated", {"order_id": "o-1", "total": 3})
        bad = await bus.publish("OrderCreated", {"order_id": "o-2"})  # no total
        async with asyncio.timeout(10):
            while (
                await inbox.seen(good.message_id) is None
                or await inbox.seen(bad.message_id) is None
            ):
                await asyncio.sleep(0.02)
        stored = json.loads(await inbox.seen(bad.message_id) or "")
    assert ran == [Order("o-1", 3)]
    assert stored["events"] == []
    assert "total" in stored["error"]["message"]


async def test_publish_sets_correlation_and_causation(memory: Brokers, tmp_path: Path) -> None:
    bus = EventBus(memory.url, service="orders", inbox=f"sqlite:///{tmp_path / 'o.db'}")
    async with bus:
        start = await bus.publish("OrderCreated", {"id": 1})
        assert start.correlation_id
        assert start.causation_id is None
        assert start.headers == {"service": "orders"}
        after = await bus.publish("OrderPaid", {"id": 1}, causation=start)
        assert after.correlation_id == start.correlation_id
        assert after.causation_id == start.message_id
        other = await bus.publish("OrderCreated", {"id": 2}, correlation_id="o-2")
        assert other.correlation_id == "o-2"


# -- the tracker ------------------------------------------------------------------------------


def envelope(kind: str, correlation: str, n: int = 0, **data: Any) -> Envelope:
    message_id = f"{correlation}-{kind}-{n}"
    return Envelope.new(kind, {"n": n, **data}, correlation_id=correlation,
                        message_id=message_id, headers={"service": "t"})  # fmt: skip


@pytest.fixture
async def reader(any_url: str) -> AsyncIterator[App]:
    """A worker App on the tracker's database: it reads, and must leave tracked sagas alone."""
    async with App(any_url, poll_interval=0.05) as app:
        assert app.executing
        yield app


async def test_tracker_rules_on_each_database(
    any_url: str, reader: App, memory: Brokers, saga_type: str
) -> None:
    """The states of a tracked saga, event by event, on SQLite and PostgreSQL."""
    async with order_tracker(any_url, memory.url, saga_type) as tracker:
        corr = f"o-{uuid.uuid4().hex[:8]}"
        for kind in ("OrderCreated", "ReserveInventory", "InventoryReserved"):
            assert await tracker.record(envelope(kind, corr)) == corr
        info = await reader.get(corr)
        assert info.state is SagaState.RUNNING
        assert info.waiting  # wake_at far ahead: no claim takes it
        await tracker.record(envelope("PaymentFailed", corr))
        assert (await reader.get(corr)).state is SagaState.COMPENSATING
        await tracker.record(envelope("ReleaseInventory", corr))
        info = await reader.get(corr)
        assert info.state is SagaState.COMPENSATING
        assert info.waiting
        await tracker.record(envelope("ReleaseInventory", corr))  # the same message again
        await tracker.record(envelope("InventoryReleased", corr))
        info = await reader.get(corr)
        assert info.state is SagaState.FAILED
        assert not info.waiting  # ended: its wake_at is cleared
        journal = await reader.journal(corr)
        recorded = [d["event"] for d in events_of(journal)]
        assert recorded == ["OrderCreated", "ReserveInventory", "InventoryReserved",
                            "PaymentFailed", "ReleaseInventory", "InventoryReleased"]  # fmt: skip
        assert [e.index for e in journal] == list(range(len(journal)))

        # A correlation id that is no plain id gets an id of its own; the key is the id.
        odd = "order 42 / eu"
        saga_id = await tracker.record(envelope("OrderCreated", odd))
        assert saga_id == tracker.saga_id(odd)
        assert saga_id != odd
        assert (await reader.get(saga_id)).idempotency_key == odd


async def test_an_event_of_another_saga_type_is_skipped(
    app: App, db_url: str, memory: Brokers, saga_type: str
) -> None:
    @app.saga("Orchestrated")
    async def orchestrated(ctx: Any, data: Any) -> str:
        return "done"

    handle = await app.start("Orchestrated", {})
    await handle.result(timeout=10)
    async with order_tracker(db_url, memory.url, saga_type) as tracker:
        assert await tracker.record(envelope("OrderCreated", handle.id)) is None
        assert await tracker.record(Envelope.new("OrderCreated", {})) is None  # no correlation
    assert [e.kind for e in await app.journal(handle.id)][-1] is Kind.SAGA_COMPLETED


async def test_concurrent_trackers_record_each_event_once(
    any_url: str, reader: App, memory: Brokers, saga_type: str
) -> None:
    """Two tracker processes (here: two stores) racing on one saga's journal."""
    one = order_tracker(any_url, memory.url, saga_type)
    two = order_tracker(any_url, memory.url, saga_type)
    async with one, two:
        corr = f"o-{uuid.uuid4().hex[:8]}"
        await one.record(envelope("OrderCreated", corr))
        events = [envelope("ReserveInventory", corr, n) for n in range(20)]
        await asyncio.gather(*(t.record(e) for e in events for t in (one, two)))
    journal = await reader.journal(corr)
    assert len(events_of(journal)) == 21
    assert [e.index for e in journal] == list(range(len(journal)))


async def test_a_stalled_flow_needs_attention(memory: Brokers, tmp_path: Path, db_url: str,
                                             saga_type: str) -> None:  # fmt: skip
    worker = App(db_url, poll_interval=0.05)
    await worker.open()
    tracker = order_tracker(db_url, await memory.open(), saga_type, deadline=0.5)
    await tracker.start()
    shop = await open_shop(memory, tmp_path, payment=False)  # nobody processes payments
    try:
        client = EventBus(await memory.open(), service="storefront", inbox=NO_INBOX)
        first = await client.publish("OrderCreated", {"order_id": "o-7", "items": [], "total": 1})
        assert first.correlation_id is not None
        # On a slow machine the flow may be parked early (a gap of 0.5 s between two events)
        # and move on; the stall that counts is the one after ProcessPayment.
        async with asyncio.timeout(15):
            while True:
                info = await settled(worker, first.correlation_id, {SagaState.NEEDS_ATTENTION})
                if "after ProcessPayment" in info.error["message"]:
                    break
                await asyncio.sleep(0.05)
    finally:
        await close_shop(shop)
        await tracker.close()
        await worker.close()
    assert info.error["type"] == "FlowStalled"
    assert "after ProcessPayment (from orders); expected PaymentProcessed" in info.error["message"]

    listed = sagakit("list", "--db", db_url, "--type", saga_type, "--json")
    [row] = json.loads(listed.stdout)
    assert row["id"] == first.correlation_id
    assert row["state"] == "needs_attention"
    shown = json.loads(sagakit("show", row["id"], "--db", db_url, "--json").stdout)
    outcomes = [r["what"] for r in shown["timeline"]]
    assert outcomes[0] == "saga started"
    assert outcomes[-1] == "needs attention"
    # OrderCreated ... ProcessPayment (the label may name the event: "event ProcessPayment")
    assert sum(what.startswith("event") for what in outcomes) == 4


def sagakit(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "sagakit", *args], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


async def test_a_parked_flow_that_moves_again_completes(
    db_url: str, memory: Brokers, saga_type: str
) -> None:
    async with App(db_url, worker=False) as reader_app:
        tracker = order_tracker(db_url, memory.url, saga_type, deadline=0.2, check_interval=0.05)
        async with tracker:
            corr = f"o-{uuid.uuid4().hex[:8]}"
            await tracker.record(envelope("OrderCreated", corr))
            await settled(reader_app, corr, {SagaState.NEEDS_ATTENTION}, timeout=5)
            await tracker.record(envelope("ReserveInventory", corr))
            assert (await reader_app.get(corr)).state is SagaState.RUNNING
            await tracker.record(envelope("OrderFulfilled", corr))
            info = await reader_app.get(corr)
        assert info.state is SagaState.COMPLETED
        kinds = [e.kind for e in await reader_app.journal(corr)]
        assert Kind.SAGA_PARKED in kinds
        assert kinds[-1] is Kind.SAGA_COMPLETED
