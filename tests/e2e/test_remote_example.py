"""The remote order example: its one command run as a subprocess over RabbitMQ, NATS and Redis
(four service processes and an orchestrator), and the same services in this process for what a
subprocess cannot show: every message delivered twice, a reply that never comes in time, and a
command sent before its service ever ran.

Real brokers are skipped locally when absent and fail the test under CI=true. Each run uses a
broker namespace of its own (``?prefix=``), so these tests share the brokers with others; they
hold the broker-test lock shared, so that no broker restart test runs meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from sagakit import App, Kind, SagaState
from sagakit.demo import audit
from sagakit.examples import remote_order as ro
from sagakit.examples.order_fulfillment import STEPS, Simulation, sample_order
from sagakit.journal import Entry
from sagakit.ledger import Ledger
from sagakit.messaging import Broker, Delivery, Envelope, open_broker
from sagakit.remote import RemoteStepFailed
from sagakit.service import Service

URLS = {
    "rabbitmq": os.environ.get("SAGAKIT_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/"),
    "nats": os.environ.get("SAGAKIT_TEST_NATS", "nats://127.0.0.1:4222"),
    "redis": os.environ.get("SAGAKIT_TEST_REDIS", "redis://127.0.0.1:6379/0"),
}
LOCK_PATH = "/tmp/sagakit-broker-tests.lock"  # the lock of tests/integration/broker_env.py
# Rates high enough that a dozen orders have declines and refused parcels (fates are drawn
# from each order's id, so they are known in advance: see expected()).
SIM = Simulation(decline_rate=0.5, shipment_failure_rate=0.3, glitch_rate=0.2, latency=0.01)
ORDERS = 12


def expected(orders: int, sim: Simulation = SIM) -> Counter[str]:
    """How many orders complete, and where the others fail, for these orders and rates."""
    fates: Counter[str] = Counter()
    for n in range(1, orders + 1):
        declined, no_carrier, _ = sim.fate(sample_order(n).order_id)
        fates["process_payment" if declined else "create_shipment" if no_carrier else "ok"] += 1
    return fates


@pytest.fixture(scope="module")
def shared_brokers() -> Iterator[None]:
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def broker_url(kind: str) -> str:
    """A broker URL with a namespace of its own; skip (or fail in CI) if it is not running."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if kind == "memory":
        return f"memory://{prefix}?prefix={prefix}"
    url = URLS[kind]
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 1).close()
    except OSError as exc:
        reason = f"{kind} is not reachable at {parts.hostname}:{parts.port} ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must start it (see .ci/run)")
        pytest.skip(reason)
    return f"{url}{'&' if parts.query else '?'}prefix={prefix}"


async def check_everything(db: str, ledger: Path, orders: int) -> None:
    """Every saga ended as its order's fate says, compensated in reverse order where it
    failed, nothing applied twice, and every row is the projection of its journal."""
    async with App(db, worker=False) as reader:
        found = await audit(reader, Ledger(ledger), STEPS)
    fates = expected(orders)
    states = Counter(found.states.values())
    assert states == {SagaState.COMPLETED: fates["ok"],
                      SagaState.FAILED: orders - fates["ok"]}  # fmt: skip
    assert found.failed_at == {k: v for k, v in fates.items() if k != "ok"}
    assert found.ledger.applied_twice == []
    assert found.ledger.unbalanced == []
    assert found.ledger.committed_reruns == 0
    assert found.ledger.reruns == 0  # every duplicate stopped at an inbox
    assert found.mismatches == []
    assert found.gaps == []
    for saga_id, state in found.states.items():
        journal = found.journals[saga_id]
        if state is SagaState.FAILED:
            done = [e.step for e in journal if e.kind is Kind.STEP_COMPLETED]
            undone = [e.step for e in journal if e.kind is Kind.COMPENSATION_COMPLETED]
            assert undone == done[::-1], journal


# -- the one command ---------------------------------------------------------------------------


def example(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    rates = ["--decline-rate", str(SIM.decline_rate), "--shipment-failure-rate",
             str(SIM.shipment_failure_rate), "--glitch-rate", str(SIM.glitch_rate),
             "--latency", str(SIM.latency)]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "sagakit.examples.remote_order", *args, *rates],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["rabbitmq", "nats", "redis"])
async def test_the_one_command_runs_services_and_orchestrator_as_processes(
    kind: str, tmp_path: Path, shared_brokers: None
) -> None:
    url = broker_url(kind)
    done = await asyncio.to_thread(
        example, "--broker", url, "--orders", str(ORDERS), "--workdir", str(tmp_path),
        cwd=tmp_path,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    fates = expected(ORDERS)
    for pid_line in ("started InventoryService (pid", "started PaymentService (pid",
                     "started ShippingService (pid", "started NotificationService (pid",
                     "started orchestrator (pid", "stopped 5 processes (SIGTERM)"):  # fmt: skip
        assert pid_line in out, out
    assert f"{ORDERS} orders over" in out
    lines = {" ".join(line.strip("│ ").split()) for line in out.splitlines()}
    assert f"completed │ {fates['ok']} │ every step done" in lines, out
    assert f"at process_payment: PaymentDeclined │ {fates['process_payment']}" in lines, out
    assert f"at create_shipment: ShipmentFailed │ {fates['create_shipment']}" in lines, out
    for check in ("not settled", "effects applied twice", "orders the ledger disagrees with",
                  "saga rows ≠ their journal"):  # fmt: skip
        assert f"{check} │ 0 ✓ │ must be 0" in lines, out
    for name in ("InventoryService", "PaymentService", "ShippingService", "NotificationService"):
        assert (tmp_path / f"{name}-inbox.db").exists()  # each service: an inbox of its own
    await check_everything(f"sqlite:///{tmp_path / 'orders.db'}", tmp_path / "ledger.db", ORDERS)


def test_a_broker_that_does_not_answer_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    done = example("--broker", f"redis://127.0.0.1:{port}/0?timeout=1", "--workdir",
                   str(tmp_path), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: cannot use the broker: message broker redis://127.0.0.1:" in done.stdout


async def test_everything_in_one_process_on_the_memory_broker(tmp_path: Path) -> None:
    config = ro.RunConfig(broker=broker_url("memory"), orders=ORDERS, workdir=tmp_path,
                          simulation=SIM)  # fmt: skip
    summary = await ro.run(config)
    assert summary.violations() == []
    fates = expected(ORDERS)
    assert summary.states[SagaState.COMPLETED] == fates["ok"]
    assert summary.reasons[SagaState.FAILED] == {
        "at process_payment: PaymentDeclined": fates["process_payment"],
        "at create_shipment: ShipmentFailed": fates["create_shipment"],
    }
    await check_everything(f"sqlite:///{tmp_path / 'orders.db'}", tmp_path / "ledger.db", ORDERS)


# -- in this process: duplicates, timeouts, commands sent early ---------------------------------


class Stutter:
    """A broker that publishes every message twice: every delivery has a duplicate."""

    def __init__(self, inner: Broker) -> None:
        self.inner = inner
        self.url = inner.url
        self.published = 0

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def publish(self, topic: str, message: Envelope) -> None:
        await self.inner.publish(topic, message)
        await self.inner.publish(topic, message)
        self.published += 1

    async def declare(self, topic: str, group: str) -> None:
        await self.inner.declare(topic, group)

    def subscribe(self, topic: str, group: str) -> AsyncIterator[Delivery]:
        return self.inner.subscribe(topic, group)


@contextlib.asynccontextmanager
async def running(
    url: str, tmp_path: Path, *, services: list[str] | None = None, timeout: float = 30.0,
    broker: Broker | None = None, declare: bool = True,
) -> AsyncIterator[tuple[App, list[Service]]]:  # fmt: skip
    """The orchestrator (on ``broker``, default ``url``) and ``services`` in this process."""
    if declare:
        await ro.declare_queues(url, ro.command_queues())
    made = ro.create_services(broker or url, ledger_path=tmp_path / "ledger.db",
                              inbox_dir=tmp_path, simulation=SIM,
                              names=ro.SERVICES if services is None else services)  # fmt: skip
    if broker is not None:
        await broker.connect()
    app = ro.create_app(f"sqlite:///{tmp_path / 'orders.db'}", broker=broker or url,
                        timeout=timeout, poll_interval=0.05)  # fmt: skip
    try:
        for service in made:
            await service.start()
        async with app:
            yield app, made
    finally:
        for service in made:
            await service.close()
        if broker is not None:
            await broker.close()
        await ro.forget_namespace(url, ro.command_queues())


async def start_orders(app: App, numbers: range) -> list[str]:
    return [(await app.start(ro.SAGA_TYPE, sample_order(n))).id for n in numbers]


async def ended(app: App, ids: list[str], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        for saga_id in ids:
            await app.wait(saga_id)


@pytest.mark.parametrize("kind", ["memory", "rabbitmq", "redis"])  # NATS drops a repeated id
async def test_every_message_delivered_twice_is_handled_once(
    kind: str, tmp_path: Path, shared_brokers: None
) -> None:
    url = broker_url(kind)
    stutter = Stutter(open_broker(url))  # commands out, replies in: everything twice
    async with running(url, tmp_path, broker=stutter) as (app, _):
        ids = await start_orders(app, range(1, ORDERS + 1))
        await ended(app, ids)
        await asyncio.sleep(0.5)  # the last duplicates come in
        journals = {i: await app.journal(i) for i in ids}
    assert stutter.published > 4 * ORDERS
    await check_everything(f"sqlite:///{tmp_path / 'orders.db'}", tmp_path / "ledger.db", ORDERS)
    calls = Ledger(tmp_path / "ledger.db").calls()
    commands = sum(e.kind in (Kind.STEP_STARTED, Kind.COMPENSATION_STARTED)
                   for entries in journals.values() for e in entries)  # fmt: skip
    assert len(calls) == commands  # one handler run per command, however often it came


def step_failed(journal: list[Entry], step: str) -> Entry | None:
    return next((e for e in journal if e.kind is Kind.STEP_FAILED and e.step == step), None)


@pytest.mark.parametrize("kind", ["memory", "rabbitmq"])
async def test_a_reply_that_never_comes_in_time_compensates_the_step_too(
    kind: str, tmp_path: Path, shared_brokers: None
) -> None:
    """NotificationService is not running: send_confirmation times out, and every step is
    compensated, that one too (it may have acted). The service starts late, gets the
    confirmation and its compensation in any order, and applies nothing it does not undo."""
    url = broker_url(kind)
    clean = next(n for n in range(1, 50) if SIM.fate(sample_order(n).order_id)[:2] == (0, 0))
    others = [s for s in ro.SERVICES if s != "NotificationService"]
    async with running(url, tmp_path, services=others, timeout=1.0) as (app, _):
        (saga_id,) = await start_orders(app, range(clean, clean + 1))
        async with asyncio.timeout(20):
            while step_failed(await app.journal(saga_id), "send_confirmation") is None:
                await asyncio.sleep(0.05)
        (late,) = ro.create_services(url, ledger_path=tmp_path / "ledger.db",
                                     inbox_dir=tmp_path, names=["NotificationService"])  # fmt: skip
        async with late:
            info = await asyncio.wait_for(app.wait(saga_id), 30)
            await asyncio.sleep(0.5)  # the late confirmation's reply is journaled as ignored
        journal = await app.journal(saga_id)
    assert info.state is SagaState.FAILED
    failed = step_failed(journal, "send_confirmation")
    assert failed is not None
    assert failed.error is not None
    assert failed.error["type"] == "StepTimedOut"
    assert (failed.data or {}).get("uncertain") is True
    undone = [e.step for e in journal if e.kind is Kind.COMPENSATION_COMPLETED]
    assert undone == [*reversed(STEPS)]
    async with App(f"sqlite:///{tmp_path / 'orders.db'}", worker=False) as reader:
        found = await audit(reader, Ledger(tmp_path / "ledger.db"), STEPS)
    assert found.ledger.applied_twice == []
    assert found.ledger.unbalanced == []


@pytest.mark.parametrize("kind", ["memory", "rabbitmq"])
async def test_a_command_sent_before_its_service_ever_ran_waits_for_it(
    kind: str, tmp_path: Path, shared_brokers: None
) -> None:
    url = broker_url(kind)
    async with running(url, tmp_path, services=[], declare=False, timeout=3) as (app, _):
        (saga_id,) = await start_orders(app, range(1, 2))
        async with asyncio.timeout(10):  # the command has left the outbox
            while (await app.store.outbox_stats())[0] or len(await app.journal(saga_id)) < 2:
                await asyncio.sleep(0.05)
        services = ro.create_services(url, ledger_path=tmp_path / "ledger.db",
                                      inbox_dir=tmp_path)  # fmt: skip
        try:
            for service in services:
                await service.start()
            started = time.monotonic()
            info = await asyncio.wait_for(app.wait(saga_id), 15)
        finally:
            for service in services:
                await service.close()
    assert info.state is SagaState.COMPLETED, (info.error, time.monotonic() - started)


def test_glitches_are_retried_and_declines_are_not(tmp_path: Path) -> None:
    """The payment step's RetryPolicy tells a failed reply's error types apart."""
    glitch = RemoteStepFailed("PaymentService.ProcessPayment", "ServiceUnavailable", "busy")
    declined = RemoteStepFailed("PaymentService.ProcessPayment", "PaymentDeclined", "no")
    payment = ro.remote_order_saga().steps[1]
    assert payment.retry.should_retry(glitch, 1)
    assert not payment.retry.should_retry(declined, 1)
    assert not payment.retry.should_retry(ValueError("local"), 1)
