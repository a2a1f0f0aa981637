"""The remote order example across a broker restart: forty orders running between the
orchestrator and the four services (in this process, each with its own broker connection and
inbox), the broker stopped mid-run and started again. Afterwards every saga has ended,
completed or failed-and-compensated exactly as its order's fate says, no reply timed out (no
message was lost), the ledger shows no effect applied twice and no order out of balance, and
every saga row is the projection of its journal.

RabbitMQ and NATS: the shared servers of the machine are stopped and started again (and left
running), under the broker-test lock held exclusively. Redis: the shared server keeps nothing
on disk, so the test runs its own with ``appendonly yes`` and ``appendfsync always`` on port
6391.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from broker_env import URLS, absent, broker_lock, require_broker, unreachable, with_options

from sagakit import App, Kind, SagaState
from sagakit.demo import audit
from sagakit.examples import remote_order as ro
from sagakit.examples.order_fulfillment import STEPS, Simulation, sample_order
from sagakit.ledger import Ledger

pytestmark = pytest.mark.crash

ORDERS = 40
# Slow enough services that the restart comes while most orders are still on their way.
SIM = Simulation(decline_rate=0.2, shipment_failure_rate=0.15, glitch_rate=0.15, latency=0.2)
REDIS_PORT = 6391
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


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def wait_until(check: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.2)


class Server:
    """A broker the test stops and starts."""

    url: str
    port: int

    async def stop(self) -> None: ...

    async def start(self) -> None: ...


class SharedRabbit(Server):
    url, port = URLS["rabbitmq"], 5672

    async def stop(self) -> None:
        await run("rabbitmqctl", "stop")
        await wait_until(lambda: not listening(self.port), "RabbitMQ stopped")

    async def start(self) -> None:
        await run("rabbitmq-server", "-detached")  # returns before the node is up
        await wait_until(lambda: listening(self.port), "RabbitMQ listens", 120)
        await run("rabbitmqctl", "await_startup", "--timeout", "60", timeout=90)


def nats_pids() -> list[int]:
    """The nats-server processes of the shared server (on port 4222)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"nats-server") and b"4222" in argv:
                pids.append(int(entry.name))
    return pids


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
    """A Redis of the test's own: every write in its append-only file before it answers."""

    port = REDIS_PORT
    url = f"redis://127.0.0.1:{REDIS_PORT}/0"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def start(self) -> None:
        await run("redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                  "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                  "--dir", str(self.directory), "--daemonize", "yes")  # fmt: skip
        await wait_until(lambda: listening(self.port), "the test's Redis listens", 20)

    async def stop(self) -> None:
        await run("redis-cli", "-p", str(self.port), "shutdown")
        await wait_until(lambda: not listening(self.port), "the test's Redis stopped", 20)


@pytest.fixture(params=["rabbitmq", "nats", "redis"])
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Server]:
    kind = request.param
    tools = {"rabbitmq": ["rabbitmqctl", "rabbitmq-server"], "nats": ["start-stop-daemon"],
             "redis": ["redis-server", "redis-cli"]}[kind]  # fmt: skip
    for tool in tools:
        if shutil.which(tool) is None:
            absent(f"{tool} is not installed; the {kind} restart test needs it")
    if kind == "redis":
        if listening(REDIS_PORT):
            pytest.fail(f"port {REDIS_PORT} is taken: this test runs its own Redis there")
        own = OwnRedis(tmp_path)
        await own.start()
        try:
            yield own
        finally:
            if listening(REDIS_PORT):
                await run("redis-cli", "-p", str(REDIS_PORT), "shutdown", "nosave")
        return
    require_broker(kind)
    shared = SharedRabbit() if kind == "rabbitmq" else SharedNats()
    async with broker_lock(exclusive=True):
        try:
            yield shared
        finally:
            if unreachable(kind) is not None:  # never leave the shared server down
                await shared.start()


def fates() -> Counter[str]:
    found: Counter[str] = Counter()
    for n in range(1, ORDERS + 1):
        declined, no_carrier, _ = SIM.fate(sample_order(n).order_id)
        found["process_payment" if declined else "create_shipment" if no_carrier else "ok"] += 1
    return found


async def settled(app: App, ids: list[str]) -> int:
    states = [(await app.get(i)).state for i in ids]
    return sum(s in ro.SETTLED for s in states)


async def test_every_saga_ends_across_a_broker_restart(server: Server, tmp_path: Path) -> None:
    # ack_wait: a delivery whose ack was lost with the connection comes again soon.
    url = with_options(server.url, prefix=f"t{uuid.uuid4().hex[:10]}", ack_wait=5, timeout=3)
    await ro.declare_queues(url, ro.command_queues())
    services = ro.create_services(url, ledger_path=tmp_path / "ledger.db", inbox_dir=tmp_path,
                                  simulation=SIM)  # fmt: skip
    db = f"sqlite:///{tmp_path / 'orders.db'}"
    app = ro.create_app(db, broker=url, timeout=90, poll_interval=0.05)
    try:
        for service in services:
            await service.start()
        async with app:
            ids = [(await app.start(ro.SAGA_TYPE, sample_order(n))).id
                   for n in range(1, ORDERS + 1)]  # fmt: skip
            async with asyncio.timeout(30):
                while await settled(app, ids) < 4:
                    await asyncio.sleep(0.05)
            await server.stop()
            at_stop = await settled(app, ids)
            await asyncio.sleep(1.0)  # sagas pile up: commands in the outbox, replies unsent
            await server.start()
            async with asyncio.timeout(120):
                for saga_id in ids:
                    await app.wait(saga_id)
    finally:
        for service in services:
            await service.close()
        await ro.forget_namespace(url, ro.command_queues())
    assert at_stop < ORDERS // 2, f"{at_stop} of {ORDERS} had ended before the broker stopped"
    async with App(db, worker=False) as reader:
        found = await audit(reader, Ledger(tmp_path / "ledger.db"), STEPS)
    expected = fates()
    ok = expected["ok"]
    states = Counter(found.states.values())
    assert states == {SagaState.COMPLETED: ok, SagaState.FAILED: ORDERS - ok}
    assert found.failed_at == {k: v for k, v in expected.items() if k != "ok"}
    assert found.ledger.applied_twice == []
    assert found.ledger.unbalanced == []
    assert found.ledger.committed_reruns == 0
    assert found.mismatches == []
    assert found.gaps == []
    failures = [e for entries in found.journals.values() for e in entries
                if e.kind is Kind.STEP_FAILED]  # fmt: skip
    timeouts = [e for e in failures if (e.error or {}).get("type") == "StepTimedOut"]
    assert timeouts == [], "a command or its reply was lost"
    for saga_id, state in found.states.items():
        journal = found.journals[saga_id]
        if state is SagaState.FAILED:
            done = [e.step for e in journal if e.kind is Kind.STEP_COMPLETED]
            undone = [e.step for e in journal if e.kind is Kind.COMPENSATION_COMPLETED]
            assert undone == done[::-1], journal
