"""Brokers restarted under running adapters: confirmed messages survive, a subscription that
was consuming goes on, and ``publish`` during the outage raises BrokerUnavailable, then works.

RabbitMQ and NATS: the shared servers of the machine are stopped and started again (and left
running); these tests hold the broker-test lock exclusively, so no other broker test of this
machine runs meanwhile. Redis: the shared server keeps nothing on disk, so the test runs a
Redis of its own with ``appendonly yes`` and ``appendfsync always`` (what the Redis adapter
needs for durability) on a free port, and SIGKILLs it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from broker_env import (
    URLS,
    absent,
    broker_lock,
    cleanup,
    require_broker,
    unreachable,
    with_options,
)

from sagakit.errors import BrokerUnavailable
from sagakit.messaging import Broker, Delivery, Envelope, open_broker
from sagakit.messaging.subscription import Subscription

pytestmark = pytest.mark.crash

TOPIC = "InventoryService.ReserveItems"
BEFORE, AFTER = 50, 10
NATS_START = [
    "start-stop-daemon", "--start", "--oknodo", "--background", "--exec", "/usr/sbin/nats-server",
    "--", "-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server",
    "-l", "/var/log/nats-server.log",
]  # fmt: skip


async def run(*command: str, timeout: float = 120) -> None:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode == 0, f"{command} failed: {out.decode(errors='replace')}"


async def wait_until(
    check: Callable[[], bool], what: str, timeout: float = 90, detail: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what} {detail()}"
        await asyncio.sleep(0.2)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def nats_pids() -> list[int]:
    """The nats-server processes of the shared server (on port 4222)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"nats-server") and b"4222" in argv:
            pids.append(int(entry.name))
    return pids


class Server:
    """A broker server the test may stop and start."""

    url: str
    port: int

    async def stop(self) -> None: ...

    async def start(self) -> None: ...


class SharedRabbit(Server):
    url, port = URLS["rabbitmq"], 5672

    async def stop(self) -> None:
        await run("rabbitmqctl", "shutdown")
        await wait_until(lambda: not listening(self.port), "RabbitMQ stopped")

    async def start(self) -> None:
        await run("rabbitmq-server", "-detached")  # returns before the node is up
        await wait_until(lambda: listening(self.port), "RabbitMQ listens", 120)
        await run("rabbitmqctl", "await_startup", "--timeout", "60", timeout=90)


class SharedNats(Server):
    url, port = URLS["nats"], 4222

    async def stop(self) -> None:
        pids = nats_pids()
        assert pids, "no nats-server process serves port 4222"
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        await wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), "NATS exits")

    async def start(self) -> None:
        await run(*NATS_START)
        await wait_until(lambda: listening(self.port), "NATS listens")


class OwnRedis(Server):
    """A Redis with AOF (fsync on every write) in a temporary directory, on a free port."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--logfile", "redis.log",
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await wait_until(lambda: listening(self.port), "the test's Redis listens", 20)

    async def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # a crash: what was acknowledged must be in the AOF
            await self.process.wait()
            self.process = None


@pytest.fixture(params=["rabbitmq", "nats", "redis"])
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Server]:
    kind = request.param
    tools = {"rabbitmq": ["rabbitmqctl", "rabbitmq-server"], "nats": ["start-stop-daemon"]}
    for tool in tools.get(kind, ["redis-server"]):
        if shutil.which(tool) is None:
            absent(f"{tool} is not installed; the {kind} restart test needs it")
    if kind == "redis":
        own = OwnRedis(tmp_path)
        await own.start()
        try:
            yield own
        finally:
            await own.stop()
        return
    require_broker(kind)
    shared = SharedRabbit() if kind == "rabbitmq" else SharedNats()
    async with broker_lock(exclusive=True):
        try:
            yield shared
        finally:
            if unreachable(kind) is not None:  # never leave the shared server down
                await shared.start()


def message(n: int) -> Envelope:
    return Envelope.new(TOPIC, {"n": n}, correlation_id=f"saga-{n}")


async def publish_n(broker: Broker, first: int, count: int) -> list[str]:
    sent = [message(n) for n in range(first, first + count)]
    for envelope in sent:
        await broker.publish(TOPIC, envelope)
    return [e.message_id for e in sent]


async def publish_when_back(broker: Broker, timeout: float = 90) -> tuple[str, int]:
    """Publish one message, retrying while the broker is unavailable; (its id, failures)."""
    deadline, failures = time.monotonic() + timeout, 0
    envelope = message(10_000)
    while True:
        try:
            await broker.publish(TOPIC, envelope)
            return envelope.message_id, failures
        except BrokerUnavailable:
            failures += 1
            assert time.monotonic() < deadline, "the broker did not accept messages again"
            await asyncio.sleep(0.2)


async def consume_into(
    subscription: AsyncIterator[Delivery], seen: set[str], pause: float = 0.0
) -> None:
    async for delivery in subscription:
        await asyncio.sleep(pause)  # slow enough that the restart comes in the middle
        seen.add(delivery.envelope.message_id)
        await delivery.ack()


async def test_restart_loses_nothing_and_consumers_go_on(server: Server) -> None:
    prefix = f"t_{uuid.uuid4().hex[:12]}"
    url = with_options(server.url, prefix=prefix, ack_wait=5, timeout=3)
    kind = {"amqp": "rabbitmq", "nats": "nats", "redis": "redis"}[url.split(":")[0]]
    broker, fresh = open_broker(url), open_broker(url)
    await broker.connect()
    try:
        live = broker.subscribe(TOPIC, "live")
        assert isinstance(live, Subscription)
        await live.start()
        await broker.declare(TOPIC, "cold")  # nobody consumes it until after the restart
        before = await publish_n(broker, 0, BEFORE)
        seen: set[str] = set()
        consumer = asyncio.create_task(consume_into(live, seen, 0.03))
        await wait_until(lambda: len(seen) >= BEFORE // 2, "the live consumer is consuming", 10)

        await server.stop()
        with pytest.raises(BrokerUnavailable):
            await broker.publish(TOPIC, message(-1))
        await server.start()
        first_after, _ = await publish_when_back(broker)
        after = [first_after, *await publish_n(broker, BEFORE, AFTER)]

        everything = set(before) | set(after)
        await wait_until(
            lambda: everything <= seen,
            "the live consumer got everything",
            60,
            lambda: (
                f"(missing {len(set(before) - seen)} sent before the restart, "
                f"{len(set(after) - seen)} sent after)"
            ),
        )
        assert not consumer.done()

        await fresh.connect()
        cold = fresh.subscribe(TOPIC, "cold")
        cold_seen: set[str] = set()
        cold_task = asyncio.create_task(consume_into(cold, cold_seen))
        await wait_until(
            lambda: everything <= cold_seen,
            "the cold group got everything",
            60,
            lambda: (
                f"(missing {len(set(before) - cold_seen)} of the {BEFORE} sent before the "
                f"restart, {len(set(after) - cold_seen)} of the {len(after)} sent after)"
            ),
        )
        cold_task.cancel()
    finally:
        await broker.close()
        await fresh.close()
    await asyncio.wait_for(consumer, 5)  # the iterator ended with the broker, without error
    if kind != "redis":
        queues = (f"{prefix}.live.{TOPIC}", f"{prefix}.cold.{TOPIC}")
        await cleanup(server.url, prefix, queues)
