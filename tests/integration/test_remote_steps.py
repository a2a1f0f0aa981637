"""Remote steps end to end: the command leaves through the outbox, a service answers over a real
broker (and the in-memory one), the saga waits unloaded for the reply.

The service here is a few lines over the Broker protocol, so these tests are about the
orchestrator's side; sagakit.service.Service has tests of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sagakit import App, Kind, RetryPolicy, Saga, SagaState, WorkflowContext, step
from sagakit.examples.runner import forget_namespace
from sagakit.messaging import Broker, Envelope, open_broker
from sagakit.remote import remote, reply

Check = Callable[[App, str], Awaitable[Any]]
BROKERS = {
    "memory": None,
    "rabbitmq": ("127.0.0.1", 5672, "amqp://guest:guest@127.0.0.1:5672/"),
    "nats": ("127.0.0.1", 4222, "nats://127.0.0.1:4222"),
    "redis": ("127.0.0.1", 6379, "redis://127.0.0.1:6379/0"),
}


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


QUEUES = [
    *((f"{svc}.{cmd}", svc) for svc, cmd in [("Inventory", "Reserve"), ("Inventory", "Release"),
                                              ("Payments", "Charge"), ("Payments", "Refund")]),
    ("sagakit.replies", "sagakit-orchestrator"),
]  # fmt: skip


@pytest.fixture(params=list(BROKERS))
async def broker_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A broker URL with a prefix of its own, so tests never see each other's messages; what
    the test made on the broker is deleted after it (durable queues would pile up)."""
    url = _broker_url(request.param)
    yield url
    if not url.startswith("memory://"):
        await forget_namespace(url, QUEUES)


def _broker_url(kind: str) -> str:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    spec = BROKERS[kind]
    if spec is None:
        return f"memory://{prefix}"
    host, port, url = spec
    if not _reachable(host, port):
        reason = f"{kind} is not reachable at {host}:{port}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must start it (see .ci/run)")
        pytest.skip(reason)
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}prefix={prefix}"


class FakeService:
    """Answers commands: ``behaviour(command, data) -> result`` or raises (a failed reply);
    returning ``...`` sends no reply at all. Counts what it handled."""

    def __init__(self, broker: Broker, behaviour: Callable[[str, Any], Any]) -> None:
        self.broker = broker
        self.behaviour = behaviour
        self.handled: Counter[str] = Counter()
        self.seen: list[Envelope] = []
        self.tasks: list[asyncio.Task[None]] = []

    def serve(self, *commands: str) -> None:
        for command in commands:
            self.tasks.append(asyncio.create_task(self._serve(command)))

    async def _serve(self, command: str) -> None:
        async for delivery in self.broker.subscribe(command, command.split(".", maxsplit=1)[0]):
            env = delivery.envelope
            self.seen.append(env)
            self.handled[command] += 1
            try:
                result = self.behaviour(command, env.data())
                answer = None if result is ... else reply(env, ok=True, payload=result)
            except Exception as exc:
                error = {"type": type(exc).__name__, "message": str(exc)}
                answer = reply(env, ok=False, payload=error)
            if answer is not None and env.reply_to:
                await self.broker.publish(env.reply_to, answer)
            await delivery.ack()

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


@contextlib.asynccontextmanager
async def running(
    db: str, broker_url: str, behaviour: Callable[[str, Any], Any], *sagas: Saga, **kw: Any
) -> AsyncIterator[tuple[App, FakeService]]:
    svc_broker = open_broker(broker_url)
    await svc_broker.connect()
    service = FakeService(svc_broker, behaviour)
    service.serve("Inventory.Reserve", "Inventory.Release", "Payments.Charge", "Payments.Refund")
    app = App(db, broker=broker_url, poll_interval=0.05, **kw)
    for saga in sagas:
        app.register(saga)
    try:
        async with app:
            yield app, service
    finally:
        await service.stop()
        await svc_broker.close()


ORDER = Saga(
    "RemoteOrder",
    steps=[
        step(
            "reserve",
            remote("Inventory.Reserve"),
            compensate=remote("Inventory.Release"),
            timeout=5,
        ),
        step("charge", remote("Payments.Charge"), compensate=remote("Payments.Refund"), timeout=5),
    ],
)


def happy(command: str, data: Any) -> Any:
    if command == "Inventory.Reserve":
        return {"reservation": f"R-{data['order']}"}
    if command == "Payments.Charge":
        if data.get("decline"):
            raise ValueError("card declined")
        return {"payment": f"P-{data['order']}"}
    return None  # compensations


async def test_a_remote_saga_completes(db_url: str, broker_url: str, check: Check) -> None:
    async with running(db_url, broker_url, happy, ORDER) as (app, service):
        handle = await app.start("RemoteOrder", {"order": 1})
        result = await asyncio.wait_for(handle.result(), 20)
        assert result == {"reserve": {"reservation": "R-1"}, "charge": {"payment": "P-1"}}
        c = await check(app, handle.id)
        starts = c.of(Kind.STEP_STARTED)
        assert [(e.data or {})["topic"] for e in starts] == ["Inventory.Reserve", "Payments.Charge"]
        command = Envelope.from_json(starts[0].payload or "")
        assert command.correlation_id == handle.id
        assert command.headers["idempotency_key"] == f"{handle.id}/reserve"
        assert await app.store.outbox_stats() == (0, None)  # relayed and deleted
        assert service.handled == Counter({"Inventory.Reserve": 1, "Payments.Charge": 1})


async def test_a_failed_reply_compensates_over_messages(
    db_url: str, broker_url: str, check: Check
) -> None:
    async with running(db_url, broker_url, happy, ORDER) as (app, service):
        handle = await app.start("RemoteOrder", {"order": 2, "decline": True})
        info = await asyncio.wait_for(app.wait(handle.id), 20)
        assert info.state is SagaState.FAILED
        assert info.error is not None
        assert "card declined" in info.error["message"]
        assert service.handled["Inventory.Release"] == 1
        assert service.handled["Payments.Refund"] == 0  # the charge failed: nothing to refund
        release = next(e for e in service.seen if e.type == "Inventory.Release")
        assert release.data() == {"input": {"order": 2, "decline": True},
                                  "result": {"reservation": "R-2"}}  # fmt: skip
        c = await check(app, handle.id)
        assert [e.step for e in c.of(Kind.COMPENSATION_COMPLETED)] == ["reserve"]


async def test_a_reply_timeout_compensates_and_a_late_reply_is_journaled(
    db_url: str, broker_url: str, check: Check
) -> None:
    late: list[Envelope] = []

    def silent_charge(command: str, data: Any) -> Any:
        if command == "Payments.Charge":
            return ...  # never answers in time
        return happy(command, data)

    quick = Saga(
        "Quick",
        steps=[
            step("reserve", remote("Inventory.Reserve"), compensate=remote("Inventory.Release")),
            step(
                "charge",
                remote("Payments.Charge"),
                compensate=remote("Payments.Refund"),
                timeout=0.5,
            ),
        ],
    )
    async with running(db_url, broker_url, silent_charge, quick) as (app, service):
        handle = await app.start("Quick", {"order": 3})
        info = await asyncio.wait_for(app.wait(handle.id), 20)
        assert info.state is SagaState.FAILED
        # the charge may have happened in its service: it is compensated too (refund first)
        assert service.handled["Payments.Refund"] == 1
        assert service.handled["Inventory.Release"] == 1
        charge = next(e for e in service.seen if e.type == "Payments.Charge")
        late.append(reply(charge, ok=True, payload={"payment": "P-late"}))
        await app.broker.publish(app.reply_topic, late[0])  # type: ignore[union-attr]
        async with asyncio.timeout(10):
            while Kind.REPLY_IGNORED not in (await check(app, handle.id)).kinds():
                await asyncio.sleep(0.05)
        c = await check(app, handle.id)
        assert c.info.state is SagaState.FAILED
        undone = [e.step for e in c.of(Kind.COMPENSATION_COMPLETED)]
        assert undone == ["charge", "reserve"]


async def test_duplicate_replies_are_harmless(db_url: str, broker_url: str, check: Check) -> None:
    async with running(db_url, broker_url, happy, ORDER) as (app, service):
        handle = await app.start("RemoteOrder", {"order": 4})
        await asyncio.wait_for(handle.result(), 20)
        for env in service.seen:  # every reply again
            await app.broker.publish(app.reply_topic, reply(env, ok=True, payload="again"))  # type: ignore[union-attr]
        await asyncio.sleep(0.5)
        c = await check(app, handle.id)
        assert c.info.state is SagaState.COMPLETED
        assert c.info.output["charge"] == {"payment": "P-4"}


FRAGILE_UNDO = Saga(
    "FragileUndo",
    steps=[
        step("reserve", remote("Inventory.Reserve"), timeout=5,
             compensate=remote("Inventory.Release"),
             compensate_retry=RetryPolicy(max_attempts=2, initial_interval=0.01)),
        step("charge", remote("Payments.Charge"), timeout=5),
    ],
)  # fmt: skip


async def test_an_operator_retry_resends_a_remote_compensation(
    db_url: str, broker_url: str
) -> None:
    """After a remote compensation failed for good and the saga needs attention, a retry
    sends the compensation again with new command ids: the fixed service runs it (a reused id
    would be a duplicate to its inbox, and the old failed reply would be read again)."""
    broken = True

    def behaviour(command: str, data: Any) -> Any:
        if command == "Inventory.Release" and broken:
            raise RuntimeError("inventory database is read-only")
        return happy(command, data)

    async with running(db_url, broker_url, behaviour, FRAGILE_UNDO) as (app, service):
        handle = await app.start("FragileUndo", {"order": 7, "decline": True})
        parked = await asyncio.wait_for(app.wait(handle.id), 20)
        assert parked.state is SagaState.NEEDS_ATTENTION
        assert service.handled["Inventory.Release"] == 2

        broken = False
        await app.retry(handle.id)
        done = await asyncio.wait_for(app.wait(handle.id), 20)
        assert done.state is SagaState.FAILED  # compensated: the charge was declined
        assert service.handled["Inventory.Release"] == 3  # the retry ran the fixed handler
        releases = [e for e in service.seen if e.type == "Inventory.Release"]
        assert len({e.message_id for e in releases}) == 3  # every attempt its own command
        journal = await app.journal(handle.id)
        assert [e.step for e in journal if e.kind is Kind.COMPENSATION_COMPLETED] == ["reserve"]


async def test_code_first_call_with_retry(db_url: str, broker_url: str) -> None:
    attempts: Counter[str] = Counter()

    def flaky(command: str, data: Any) -> Any:
        attempts[command] += 1
        if command == "Payments.Charge" and attempts[command] < 3:
            raise ConnectionError("gateway busy")
        return happy(command, data)

    async def workflow(ctx: WorkflowContext, data: Any) -> Any:
        reserved = await ctx.call("Inventory.Reserve", data, compensate="Inventory.Release")
        paid = await ctx.call("Payments.Charge", data, timeout=5,
                              retry=RetryPolicy(max_attempts=3, initial_interval=0.01))  # fmt: skip
        return [reserved, paid]

    saga = Saga("CallFirst", workflow=workflow)
    async with running(db_url, broker_url, flaky, saga) as (app, _):
        handle = await app.start("CallFirst", {"order": 5})
        assert await asyncio.wait_for(handle.result(), 20) == [
            {"reservation": "R-5"},
            {"payment": "P-5"},
        ]
        assert attempts["Payments.Charge"] == 3


async def test_commands_wait_in_the_outbox_while_no_broker_relays_them(
    tmp_path: Path, broker_url: str
) -> None:
    """A worker without its broker for a while: the saga waits, nothing is lost."""
    db = f"sqlite:///{tmp_path / 'o.db'}"
    async with App(db, poll_interval=0.05) as app:  # no broker: the command stays put
        app.register(ORDER)
        handle = await app.start("RemoteOrder", {"order": 6})
        async with asyncio.timeout(10):
            while (await app.store.outbox_stats())[0] == 0:
                await asyncio.sleep(0.02)
    async with running(db, broker_url, happy, ORDER) as (app, _):
        result = await asyncio.wait_for(app.handle(handle.id).result(), 20)
        assert result["charge"] == {"payment": "P-6"}
