"""The choreographed order example end to end: five services that only react to events, a
tracker that records each order's flow as an ``OrderChoreography`` saga, on the memory broker
and on real ones (skipped locally when absent, failed under CI=true); a flow that stalls
because a service is down is flagged ``needs_attention``, and moves on when it is back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from broker_env import URLS, broker_lock, require_broker, with_options

from sagakit import App, Kind, SagaState
from sagakit.choreography import EventBus
from sagakit.demo import audit
from sagakit.examples import choreographed_order as co
from sagakit.examples.order_fulfillment import STEPS, Simulation, sample_order
from sagakit.examples.remote_order import declare_queues, forget_namespace
from sagakit.journal import Entry
from sagakit.ledger import Ledger

SIM = Simulation(decline_rate=0.5, shipment_failure_rate=0.3, glitch_rate=0.2, latency=0.01)
ORDERS = 12
HAPPY = ["OrderCreated", *co.STEPS, "OrderCompleted"]
DECLINED = ["OrderCreated", *co.STEPS[:3], "PaymentFailed", "ReleaseInventory",
            "InventoryReleased", "OrderCancelled"]  # fmt: skip
NO_CARRIER = ["OrderCreated", *co.STEPS[:5], "ShipmentFailed", "RefundPayment", "PaymentRefunded",
              "ReleaseInventory", "InventoryReleased", "OrderCancelled"]  # fmt: skip


def fate(n: int) -> str:
    declined, no_carrier, _ = SIM.fate(sample_order(n).order_id)
    return "PaymentFailed" if declined else "ShipmentFailed" if no_carrier else "ok"


@pytest.fixture
async def url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A broker URL of the test's own namespace (the parameter names the broker)."""
    kind, prefix = request.param, f"t{uuid.uuid4().hex[:10]}"
    if kind == "memory":
        yield f"memory://{prefix}?prefix={prefix}"
        return
    require_broker(kind)
    async with broker_lock(exclusive=False):
        yield with_options(URLS[kind], prefix=prefix)


def recorded(journal: list[Entry]) -> list[str]:
    return [str((e.data or {}).get("event")) for e in journal if e.kind is Kind.EVENT_RECORDED]


@pytest.mark.parametrize("url", ["memory", "rabbitmq"], indirect=True)
async def test_every_flow_completes_or_is_compensated(url: str, tmp_path: Path) -> None:
    """On memory the services are event buses in this process; on RabbitMQ, processes."""
    config = co.ChoreographyConfig(broker=url, orders=ORDERS, workdir=tmp_path, simulation=SIM)
    summary = await co.run(config)
    assert summary.violations() == []
    fates = Counter(fate(n) for n in range(1, ORDERS + 1))
    assert summary.states == {SagaState.COMPLETED: fates["ok"],
                              SagaState.FAILED: ORDERS - fates["ok"]}  # fmt: skip
    assert summary.reasons[SagaState.FAILED] == {
        f"after {k}": v for k, v in fates.items() if k != "ok"
    }
    assert summary.ledger.applied_twice == []
    assert summary.ledger.unbalanced == []
    async with App(f"sqlite:///{tmp_path / 'orders.db'}", worker=False) as reader:
        sagas = await reader.list(saga_type=co.SAGA_TYPE, limit=100)
        assert len(sagas) == ORDERS
        for info in sagas:
            journal = await reader.journal(info.id)
            kind = fate(int(info.input["order"]["order_id"].split("-")[1]))
            want = {"ok": HAPPY, "PaymentFailed": DECLINED, "ShipmentFailed": NO_CARRIER}[kind]
            # Events of one flow may be recorded out of order; each is recorded once.
            assert sorted(recorded(journal)) == sorted(want), (kind, recorded(journal))
            if kind != "ok":
                assert info.error is not None
                assert info.error["type"] == kind


@pytest.mark.parametrize("url", ["memory", "nats"], indirect=True)
async def test_a_stalled_flow_is_flagged_and_moves_on_when_its_service_is_back(
    url: str, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'orders.db'}"
    clean = [n for n in range(1, 40) if fate(n) == "ok"][:3]
    queues = co.event_queues()  # ShippingService's too: ShipOrder waits for it
    await declare_queues(url, queues)
    without_shipping = [s for s in co.SERVICES if s != "ShippingService"]
    buses = co.create_buses(url, ledger_path=tmp_path / "ledger.db", inbox_dir=tmp_path,
                            simulation=SIM, names=without_shipping)  # fmt: skip
    tracker = co.create_tracker(db, url, deadline=1.0, check_interval=0.1)
    storefront = EventBus(url, service="Storefront")
    try:
        async with App(db, worker=False) as reader:
            for bus in [*buses, tracker, storefront]:
                await bus.start()
            ids = []
            for n in clean:
                sent = await storefront.publish("OrderCreated", {"order": sample_order(n)})
                ids.append(tracker.saga_id(sent.correlation_id or ""))
            async with asyncio.timeout(20):
                while {await state(reader, i) for i in ids} != {SagaState.NEEDS_ATTENTION}:
                    await asyncio.sleep(0.05)
            parked = [await reader.get(i) for i in ids]

            (shipping,) = co.create_buses(url, ledger_path=tmp_path / "ledger.db",
                                          inbox_dir=tmp_path, simulation=SIM,
                                          names=["ShippingService"])  # fmt: skip
            buses.append(shipping)
            await shipping.start()
            async with asyncio.timeout(20):
                while {await state(reader, i) for i in ids} != {SagaState.COMPLETED}:
                    await asyncio.sleep(0.05)
            found = await audit(reader, Ledger(tmp_path / "ledger.db"), STEPS)
            journals = [await reader.journal(i) for i in ids]
    finally:
        for part in [storefront, tracker, *buses]:
            await part.close()
        await forget_namespace(url, [*queues, *((t, tracker.group) for t in tracker.flow.topics)])
    for info in parked:
        assert info.error is not None
        assert info.error["type"] == "FlowStalled"
        assert "after ShipOrder (from OrderService); expected OrderShipped" in info.error["message"]
        assert info.current_step == "ShipOrder"
    for journal in journals:
        kinds = [e.kind for e in journal]
        assert Kind.SAGA_PARKED in kinds
        assert kinds[-1] is Kind.SAGA_COMPLETED
        assert sorted(recorded(journal)) == sorted(HAPPY)
    assert found.ledger.applied_twice == []
    assert found.ledger.unbalanced == []


async def state(reader: App, saga_id: str) -> SagaState | None:
    try:
        return (await reader.get(saga_id)).state
    except Exception:  # the tracker has not recorded the first event yet
        return None


def example(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    return subprocess.run(
        [sys.executable, "-m", "sagakit.examples.choreographed_order", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def table(out: str) -> set[str]:
    """The summary's rows, as ``cell │ cell │ cell`` without padding."""
    return {" ".join(line.strip("│ ").split()) for line in out.splitlines()}


def test_the_one_command_in_one_process(tmp_path: Path) -> None:
    done = example("--broker", "memory://example", "--orders", "8", "--workdir", str(tmp_path),
                   cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table(done.stdout)
    assert "8 orders over memory://example: 5 services in this process + tracker" in done.stdout
    assert "not settled │ 0 ✓ │ must be 0" in rows, done.stdout
    assert "effects applied twice │ 0 ✓ │ must be 0" in rows, done.stdout
    assert f"try: sagakit list --type {co.SAGA_TYPE}" in done.stdout


def test_the_one_command_flags_the_flows_a_missing_service_stalls(tmp_path: Path) -> None:
    done = example("--broker", "memory://example", "--orders", "4", "--workdir", str(tmp_path),
                   "--without", "ShippingService", "--deadline", "0.5", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table(done.stdout)
    stalled = sum(fate(n) != "PaymentFailed" for n in range(1, 5))
    assert f"needs_attention │ {stalled}" in rows, done.stdout
    assert f"stalled after ShipOrder │ {stalled}" in rows, done.stdout
