"""The Service end to end: commands in through a broker, handlers run once through the inbox,
replies out. On the in-memory broker and on every real broker whose adapter exists, with the
inbox on SQLite and on PostgreSQL, and sharing sagakit's own database."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from service_helpers import (
    Effects,
    Replies,
    command,
    connected,
)

from sagakit import App
from sagakit.errors import BrokerError, BrokerUnavailable
from sagakit.inbox import Inbox
from sagakit.messaging import Broker, Envelope
from sagakit.remote import COMPLETED, FAILED, reply
from sagakit.service import HandlerContext, Service


@pytest.fixture(params=["memory", "rabbitmq", "nats", "redis"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    async with connected(request.param) as instance:
        yield instance


@pytest.fixture
async def memory() -> AsyncIterator[Broker]:
    async with connected("memory") as instance:
        yield instance


@pytest.fixture
def name() -> str:
    """A service name of its own per test: its topics and groups are the test's alone."""
    return f"Inventory{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def replies(request: pytest.FixtureRequest, name: str) -> AsyncIterator[Replies]:
    instance = request.getfixturevalue("memory" if "memory" in request.fixturenames else "broker")
    async with Replies(instance, f"{name}.replies") as collector:
        yield collector


def copies(broker: Broker) -> int:
    """How many deliveries two publishes of one command make: NATS JetStream stores a message
    id once within its duplicate window (``Nats-Msg-Id``), the others deliver both."""
    return 1 if type(broker).__name__ == "NatsBroker" else 2


def send(svc: str, name: str, data: Any, **kw: Any) -> Envelope:
    return command(svc, name, data, reply_to=f"{svc}.replies", **kw)


# -- one command, its reply --------------------------------------------------------------------


async def test_command_handled_once_and_replied(
    broker: Broker, name: str, replies: Replies, tmp_path: Path
) -> None:
    seen: list[HandlerContext] = []
    service = Service(name, broker=broker, inbox=f"sqlite:///{tmp_path / 'inbox.db'}")

    @service.handles("ReserveItems")
    async def reserve(ctx: HandlerContext, data: dict[str, Any]) -> dict[str, Any]:
        seen.append(ctx)
        return {"reserved": data["qty"]}

    async with service:
        cmd = send(name, "ReserveItems", {"qty": 3}, step="reserve_items", attempt=2)
        await broker.publish(cmd.type, cmd)
        (answer,) = await replies.wait(cmd)

    assert answer.type == COMPLETED
    assert answer.data() == {"reserved": 3}
    assert answer.causation_id == cmd.message_id
    assert answer.correlation_id == cmd.correlation_id
    assert answer.message_id == reply(cmd, ok=True, payload=None).message_id
    (ctx,) = seen
    assert (ctx.saga_id, ctx.message_id, ctx.step, ctx.attempt) == (
        cmd.correlation_id,
        cmd.message_id,
        "reserve_items",
        2,
    )
    assert ctx.idempotency_key == f"{cmd.correlation_id}/reserve_items"
    assert ctx.command == f"{name}.ReserveItems"
    assert ctx.compensation is False
    assert ctx.headers["saga_type"] == "order"


async def test_duplicate_runs_the_effect_once_and_replies_twice(
    broker: Broker, name: str, replies: Replies, tmp_path: Path
) -> None:
    runs: list[str] = []
    service = Service(name, broker=broker, inbox=f"sqlite:///{tmp_path / 'inbox.db'}")

    @service.handles("ReserveItems")
    async def reserve(ctx: HandlerContext, data: Any) -> str:
        runs.append(ctx.message_id)
        return "ok"

    async with service:
        cmd = send(name, "ReserveItems", {"sku": "A"})
        await broker.publish(cmd.type, cmd)
        await replies.wait(cmd)
        await broker.publish(cmd.type, cmd)
        answers = await replies.wait(cmd, copies(broker))

    assert runs == [cmd.message_id]
    assert len({a.to_json() for a in answers}) == 1  # the stored reply: same id, same time


async def test_business_error_is_a_failed_reply_remembered(
    broker: Broker, name: str, replies: Replies, tmp_path: Path
) -> None:
    runs = 0
    service = Service(name, broker=broker, inbox=f"sqlite:///{tmp_path / 'inbox.db'}")

    class OutOfStock(Exception):
        pass

    @service.handles("ReserveItems")
    async def reserve(ctx: HandlerContext, data: Any) -> None:
        nonlocal runs
        runs += 1
        raise OutOfStock("only 2 left of sku A")

    async with service:
        cmd = send(name, "ReserveItems", {"sku": "A"})
        await broker.publish(cmd.type, cmd)
        await replies.wait(cmd)
        await broker.publish(cmd.type, cmd)
        first, *others = await replies.wait(cmd, copies(broker))

    assert first.type == FAILED
    assert first.data() == {"type": "OutOfStock", "message": "only 2 left of sku A"}
    assert first.causation_id == cmd.message_id
    assert all(other == first for other in others)
    assert runs == 1


class SimulatedCrash(BaseException):
    """Stops the handling task dead: no ack, no nack, as if the process died."""


class CrashOnFirstReply:
    """The broker, except that the first reply publish crashes the process."""

    def __init__(self, inner: Broker) -> None:
        self.inner, self.url, self.crashed = inner, inner.url, False

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, topic: str, message: Envelope) -> None:
        if message.type in (COMPLETED, FAILED) and not self.crashed:
            self.crashed = True
            raise SimulatedCrash
        await self.inner.publish(topic, message)

    async def declare(self, topic: str, group: str) -> None:
        await self.inner.declare(topic, group)

    def subscribe(self, topic: str, group: str) -> Any:
        return self.inner.subscribe(topic, group)


async def test_crash_between_inbox_commit_and_reply(
    broker: Broker, name: str, replies: Replies, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = 0
    inbox = f"sqlite:///{tmp_path / 'inbox.db'}"

    def make(with_broker: Any) -> Service:
        service = Service(name, broker=with_broker, inbox=inbox)

        @service.handles("ReserveItems")
        async def reserve(ctx: HandlerContext, data: Any) -> str:
            nonlocal runs
            runs += 1
            return "reserved"

        return service

    crashing = CrashOnFirstReply(broker)
    first = make(crashing)
    cmd = send(name, "ReserveItems", {"sku": "A"})
    async with first:
        await broker.publish(cmd.type, cmd)
        while not crashing.crashed:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert replies.to(cmd) == []
        assert (await Effects(inbox).inbox()).keys() == {cmd.message_id}
    # The process "restarts": the delivery it never acked comes to the new one.
    with caplog.at_level(logging.INFO, "sagakit.service"):
        async with make(broker):
            (answer,) = await replies.wait(cmd, timeout=60)
    assert answer.data() == "reserved"
    assert runs == 1
    assert "is a duplicate" in caplog.text


class Flaky:
    """The broker, except that publishing a reply first raises each of ``failures``."""

    def __init__(self, inner: Broker, failures: list[Exception]) -> None:
        self.inner, self.url, self.failures = inner, inner.url, failures

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, topic: str, message: Envelope) -> None:
        if message.type in (COMPLETED, FAILED) and self.failures:
            raise self.failures.pop(0)
        await self.inner.publish(topic, message)

    async def declare(self, topic: str, group: str) -> None:
        await self.inner.declare(topic, group)

    def subscribe(self, topic: str, group: str) -> Any:
        return self.inner.subscribe(topic, group)


async def test_reply_waits_for_the_broker(memory: Broker, name: str, replies: Replies) -> None:
    """Publishing the reply is retried with backoff while the broker is unreachable; another
    broker error gives the delivery back, and the inbox answers it the next time."""
    down = BrokerUnavailable("memory://", "down")
    flaky = Flaky(memory, [down, down, BrokerError("refused"), down])
    runs = 0
    service = Service(name, broker=flaky, inbox="sqlite:///:memory:", retry_delay=0.05)

    @service.handles("ReserveItems")
    async def reserve(ctx: HandlerContext, data: Any) -> int:
        nonlocal runs
        runs += 1
        return 7

    async with service:
        cmd = send(name, "ReserveItems", None)
        await memory.publish(cmd.type, cmd)
        (answer,) = await replies.wait(cmd)
    assert (answer.data(), runs, flaky.failures) == (7, 1, [])


# -- what is not a normal command ---------------------------------------------------------------


async def test_command_without_reply_to(memory: Broker, name: str, tmp_path: Path) -> None:
    done = asyncio.Event()
    url = f"sqlite:///{tmp_path / 'inbox.db'}"
    service = Service(name, broker=memory, inbox=url)

    @service.handles("Notify")
    def notify(ctx: HandlerContext, data: Any) -> str:  # a plain function: in a thread
        done.set()
        return "noted"

    async with service:
        cmd = command(name, "Notify", {"x": 1}, reply_to=None)
        await memory.publish(cmd.type, cmd)
        await asyncio.wait_for(done.wait(), 10)
        for _ in range(100):
            if await service.inbox.seen(cmd.message_id) is not None:
                break
            await asyncio.sleep(0.02)
        assert await service.inbox.seen(cmd.message_id) == ""


async def test_unknown_command_type_gets_a_failed_reply(
    memory: Broker, name: str, replies: Replies
) -> None:
    service = Service(name, broker=memory, inbox="sqlite:///:memory:")

    @service.handles("ReserveItems")
    async def reserve(ctx: HandlerContext, data: Any) -> None: ...

    async with service:
        cmd = send(name, "ShipItems", {})
        await memory.publish(f"{name}.ReserveItems", cmd)
        (answer,) = await replies.wait(cmd)
    assert answer.type == FAILED
    assert answer.data()["type"] == "UnknownCommand"
    assert "ShipItems" in answer.data()["message"]


async def test_corrupt_command_is_logged_and_acked(
    memory: Broker, name: str, replies: Replies, caplog: pytest.LogCaptureFixture
) -> None:
    runs: list[Any] = []
    service = Service(name, broker=memory, inbox="sqlite:///:memory:")

    @service.handles("ReserveItems")
    async def reserve(ctx: HandlerContext, data: Any) -> None:
        runs.append(data)

    good = send(name, "ReserveItems", 1)
    corrupt = dataclasses.replace(send(name, "ReserveItems", 2, step="x"), payload="{not json")
    with caplog.at_level(logging.INFO, "sagakit.service"):
        async with service:
            await memory.publish(good.type, corrupt)
            await memory.publish(good.type, good)
            await replies.wait(good)
        # Acked, so not delivered again: a restarted service does not see it.
        again = Service(name, broker=memory, inbox="sqlite:///:memory:")
        again.handles("ReserveItems")(reserve)
        async with again:
            await asyncio.sleep(0.3)
    assert runs == [1]
    assert caplog.text.count("dropping corrupt command") == 1
    assert str(corrupt.correlation_id) in caplog.text


async def test_input_type_rebuilds_the_payload(memory: Broker, name: str, replies: Replies) -> None:
    @dataclass
    class Reservation:
        sku: str
        qty: int

    got: list[Any] = []
    service = Service(name, broker=memory, inbox="sqlite:///:memory:")

    @service.handles("ReserveItems", input_type=Reservation)
    async def reserve(ctx: HandlerContext, data: Reservation) -> int:
        got.append(data)
        return data.qty

    async with service:
        ok = send(name, "ReserveItems", {"sku": "A", "qty": 2}, step="a")
        bad = send(name, "ReserveItems", {"qty": 2}, step="b")
        await memory.publish(ok.type, ok)
        await memory.publish(bad.type, bad)
        (answer,) = await replies.wait(ok)
        (failed,) = await replies.wait(bad)
    assert got == [Reservation("A", 2)]
    assert answer.data() == 2
    assert failed.type == FAILED
    assert "sku" in failed.data()["message"]


# -- concurrency ---------------------------------------------------------------------------------


async def test_concurrent_duplicates_run_the_effect_once(
    memory: Broker, name: str, replies: Replies, any_url: str
) -> None:
    """Copies of one command in flight at once, in one service and in a second service of the
    same group (another process): one runs the handler, the others wait and get its reply."""
    effects = Effects(any_url)
    async with Inbox(any_url):  # creates the schema the effects table goes in
        pass
    await effects.create()
    release = asyncio.Event()
    runs: list[str] = []

    def make() -> Service:
        service = Service(name, broker=memory, inbox=any_url, concurrency=4)

        @service.handles("ReserveItems")
        async def reserve(ctx: HandlerContext, data: Any) -> str:
            runs.append(ctx.message_id)
            await release.wait()
            await Effects.write(ctx.db, ctx.idempotency_key or "", "A")
            return "reserved"

        return service

    async with make(), make():
        cmd = send(name, "ReserveItems", {"sku": "A"})
        for _ in range(4):
            await memory.publish(cmd.type, cmd)
        while not runs:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the copies reach the inbox and wait there
        release.set()
        answers = await replies.wait(cmd, 4)
    assert runs == [cmd.message_id]
    assert len({a.to_json() for a in answers}) == 1
    assert await effects.rows() == [(f"{cmd.correlation_id}/reserve", "A")]


async def test_concurrency_is_bounded(
    memory: Broker, name: str, replies: Replies, pg_url: str
) -> None:
    running = peak = 0
    service = Service(name, broker=memory, inbox=pg_url, concurrency=3)

    @service.handles("ReserveItems")
    async def reserve(ctx: HandlerContext, data: Any) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.1)
        running -= 1

    async with service:
        cmds = [send(name, "ReserveItems", i, step=f"s{i}") for i in range(9)]
        for cmd in cmds:
            await memory.publish(cmd.type, cmd)
        for cmd in cmds:
            await replies.wait(cmd)
    assert peak == 3


# -- sharing sagakit's database ------------------------------------------------------------------


async def test_shared_database_commits_effect_and_inbox_together(
    memory: Broker, name: str, replies: Replies, any_url: str
) -> None:
    """The inbox in the App's own database: a handler's writes commit with the inbox row; a
    handler that raises leaves no writes, but its inbox row and failed reply commit."""
    async with App(any_url, worker=False) as app:
        await app.list()  # sagakit's tables exist
        effects = Effects(any_url)
        before = await effects.tables()
        await effects.create()
        service = Service(name, broker=memory, inbox=any_url)

        @service.handles("ReserveItems")
        async def reserve(ctx: HandlerContext, data: dict[str, Any]) -> str:
            await Effects.write(ctx.db, ctx.idempotency_key or "", data["sku"])
            if data.get("fail"):
                raise ValueError(f"sku {data['sku']} is discontinued")
            return "reserved"

        async with service:
            ok = send(name, "ReserveItems", {"sku": "A"}, step="ok")
            bad = send(name, "ReserveItems", {"sku": "B", "fail": True}, step="bad")
            await memory.publish(ok.type, ok)
            await memory.publish(bad.type, bad)
            (done,) = await replies.wait(ok)
            (failed,) = await replies.wait(bad)
            # A handler whose own SQL fails (a duplicate key): on PostgreSQL that aborts the
            # transaction, and the savepoint still lets the inbox row and reply commit.
            clash = send(name, "ReserveItems", {"sku": "C"}, saga_id=ok.correlation_id, step="ok")
            clash = dataclasses.replace(clash, message_id="another-attempt")
            await memory.publish(clash.type, clash)
            (refused,) = await replies.wait(clash)

        assert (done.type, failed.type, refused.type) == (COMPLETED, FAILED, FAILED)
        assert failed.data() == {"type": "ValueError", "message": "sku B is discontinued"}
        assert refused.data()["type"] in ("IntegrityError", "UniqueViolationError")
        assert await effects.rows() == [(f"{ok.correlation_id}/ok", "A")]
        assert await effects.inbox() == {
            ok.message_id: done.to_json(),
            bad.message_id: failed.to_json(),
            clash.message_id: refused.to_json(),
        }
        assert await effects.tables() == before | {"stock_reservations", "sagakit_inbox"}
        await app.list()  # sagakit's own tables are untouched and still work


async def test_sync_handler_writes_in_the_transaction(
    memory: Broker, name: str, replies: Replies, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    effects = Effects(url)
    async with Inbox(url):
        pass
    await effects.create()
    service = Service(name, broker=memory, inbox=url)

    @service.handles("ReserveItems")
    def reserve(ctx: HandlerContext, data: dict[str, Any]) -> None:
        ctx.db.execute("INSERT INTO stock_reservations VALUES (?, ?)", (ctx.step, data["sku"]))
        if data["sku"] == "B":
            raise RuntimeError("nope")

    async with service:
        a = send(name, "ReserveItems", {"sku": "A"}, step="a")
        b = send(name, "ReserveItems", {"sku": "B"}, step="b")
        await memory.publish(a.type, a)
        await replies.wait(a)
        await memory.publish(b.type, b)
        (failed,) = await replies.wait(b)
    assert await effects.rows() == [("a", "A")]
    assert failed.data()["type"] == "RuntimeError"


# -- lifecycle -----------------------------------------------------------------------------------


async def test_run_until_closed_or_cancelled(
    memory: Broker, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    service = Service(name, broker=memory)

    @service.handles("ReserveItems")
    async def reserve(ctx: HandlerContext, data: Any) -> None: ...

    runner = asyncio.create_task(service.run())
    await asyncio.sleep(0.1)
    assert (tmp_path / f"{name}-inbox.db").exists()  # the default inbox, durable
    await service.close()
    await asyncio.wait_for(runner, 5)

    again = Service(name, broker=memory)
    again.handles("ReserveItems")(reserve)
    runner = asyncio.create_task(again.run())
    await asyncio.sleep(0.1)
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(runner, 5)
    assert runner.cancelled()


async def test_close_gives_back_the_commands_in_hand(
    memory: Broker, name: str, replies: Replies, any_url: str
) -> None:
    """A command still running when close() runs out of grace is cancelled: its transaction
    rolls back (no effect, no inbox row) and the next service to start handles it afresh."""
    effects = Effects(any_url)
    async with Inbox(any_url):
        pass
    await effects.create()
    started, runs = asyncio.Event(), 0

    def make() -> Service:
        service = Service(name, broker=memory, inbox=any_url)

        @service.handles("ReserveItems")
        async def reserve(ctx: HandlerContext, data: Any) -> str:
            nonlocal runs
            runs += 1
            await Effects.write(ctx.db, f"run{runs}", "A")
            started.set()
            if runs == 1:
                await asyncio.Event().wait()  # hangs until cancelled
            return "reserved"

        return service

    cmd = send(name, "ReserveItems", {})
    first = make()
    await first.start()
    await memory.publish(cmd.type, cmd)
    await asyncio.wait_for(started.wait(), 10)
    await first.close(grace=0.1)
    assert await effects.rows() == []
    assert await effects.inbox() == {}
    async with make():
        (answer,) = await replies.wait(cmd)
    assert (runs, answer.data()) == (2, "reserved")
    assert await effects.rows() == [("run2", "A")]


async def test_an_inbox_given_as_an_object_stays_open(
    memory: Broker, name: str, replies: Replies, tmp_path: Path
) -> None:
    async with Inbox(f"sqlite:///{tmp_path / 'inbox.db'}") as inbox:
        service = Service(name, broker=memory, inbox=inbox)

        @service.handles("ReserveItems")
        async def reserve(ctx: HandlerContext, data: Any) -> int:
            return 1

        async with service:
            cmd = send(name, "ReserveItems", None)
            await memory.publish(cmd.type, cmd)
            (answer,) = await replies.wait(cmd)
        assert await inbox.seen(cmd.message_id) == answer.to_json()  # still open: its owner's
