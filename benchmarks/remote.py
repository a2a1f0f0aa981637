"""sagakit benchmarks: remote steps over real brokers, and the outbox relay.

1. Remote sagas: the order saga of ``order_saga.py`` with all four steps remote
   (``remote("Inventory.Reserve")``, ...; every 10th order declined at payment and its
   reservation released by a remote compensation), answered by four :class:`Service` s whose
   handlers are the order saga's own trivial step functions. Per database (sagakit's store;
   each service's inbox is on the same kind of database) and per broker: sagas/s one at a time
   and with 64 in flight, and the latency of one saga from ``start`` to its end, beside the
   same saga with local steps (``ORDER_SAGA``) measured the same way in this run.
   The services run in this process by default (``--services process``: in a process of
   their own, closer to a deployment; the memory broker is then left out).
2. The outbox relay: N sagas whose first step is remote are started on an App without a broker,
   so their N commands wait in the outbox; then an :class:`OutboxRelay` relays them to each
   broker, and the figure is commands/s until the outbox is empty.

Run with ``make bench`` or ``.venv/bin/python benchmarks/remote.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import order_saga
from order_saga import ORDER_SAGA
from sagakit import App, Saga, step
from sagakit.bench import scratch_schema
from sagakit.examples.runner import forget_namespace
from sagakit.journal import TERMINAL, SagaState
from sagakit.messaging import open_broker
from sagakit.messaging.outbox import OutboxRelay
from sagakit.remote import DEFAULT_REPLY_TOPIC, remote
from sagakit.service import HandlerContext, Service
from sagakit.store import open_store

BROKERS = {
    "memory": "memory://bench",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "nats": "nats://127.0.0.1:4222",
    "redis": "redis://127.0.0.1:6379/0",
}


async def undo(ctx: HandlerContext, data: dict[str, Any]) -> None:
    """Every compensation: ``data`` is ``{"input": ..., "result": ...}``."""


# service -> (step, action command, its handler, compensation command)
SERVICES = {
    "Inventory": ("reserve_inventory", "Reserve", order_saga.reserve, "Release"),
    "Payments": ("process_payment", "Charge", order_saga.charge, "Refund"),
    "Shipping": ("create_shipment", "Ship", order_saga.ship, "CancelShipment"),
    "Notifications": ("send_confirmation", "Confirm", order_saga.confirm, "Retract"),
}
REMOTE_SAGA = Saga(
    "RemoteOrder",
    steps=[
        step(name, remote(f"{svc}.{do}"), compensate=remote(f"{svc}.{comp}"))
        for svc, (name, do, _, comp) in SERVICES.items()
    ],
)
FIRST_COMMAND, FIRST_SERVICE = "Inventory.Reserve", "Inventory"


# -- databases, broker namespaces, services -----------------------------------------------------


@contextlib.asynccontextmanager
async def database(args: argparse.Namespace, backend: str, name: str) -> AsyncIterator[str]:
    """A fresh database URL: a SQLite file in the work directory, or a PostgreSQL schema."""
    if backend == "sqlite":
        yield f"sqlite:///{args.workdir / f'{name}-{uuid.uuid4().hex[:6]}.db'}"
        return
    async with scratch_schema(args.pg) as url:
        yield url


@contextlib.asynccontextmanager
async def namespace(broker: str) -> AsyncIterator[str]:
    """The broker's URL with a prefix of its own; what was made under it is deleted after."""
    prefix = f"bench{uuid.uuid4().hex[:10]}"
    base = f"memory://{prefix}" if broker == "memory" else BROKERS[broker]
    url = f"{base}{'&' if '?' in base else '?'}prefix={prefix}"
    try:
        yield url
    finally:
        if broker != "memory":
            await forget_namespace(url, queues())


def queues() -> Iterator[tuple[str, str]]:
    """(topic, group) of every durable queue a run makes."""
    for svc, (_, do, _, comp) in SERVICES.items():
        yield f"{svc}.{do}", svc
        yield f"{svc}.{comp}", svc
    yield DEFAULT_REPLY_TOPIC, "sagakit-orchestrator"


def make_services(broker_url: str, inboxes: dict[str, str]) -> list[Service]:
    services = []
    for svc, (_, do, action, comp) in SERVICES.items():
        service = Service(svc, broker=broker_url, inbox=inboxes[svc])
        service.handles(do)(action)
        service.handles(comp)(undo)
        services.append(service)
    return services


@contextlib.asynccontextmanager
async def services_here(broker_url: str, inboxes: dict[str, str]) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for service in make_services(broker_url, inboxes):
            await stack.enter_async_context(service)
        yield


@contextlib.asynccontextmanager
async def services_apart(broker_url: str, inboxes: dict[str, str]) -> AsyncIterator[None]:
    """The four services in a child process (``--serve``), until it is sent SIGTERM."""
    command = [sys.executable, __file__, "--serve", broker_url, json.dumps(inboxes)]
    child = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"the services process did not start: {line!r}")
        yield
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
        await child.wait()


async def serve(broker_url: str, inboxes: dict[str, str]) -> None:
    """The child of ``services_apart``: run the services until SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with services_here(broker_url, inboxes):
        print("ready", flush=True)
        await stop.wait()


# -- driving sagas ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    sequential: float  # sagas/s, one at a time
    in_flight: float  # sagas/s, args.in_flight at a time
    p50: float  # seconds from start to end, one at a time
    p95: float
    cpu: float  # this process's CPU seconds per saga, with args.in_flight at a time


class Orders:
    """Order numbers, never reused within a database: every 10th is declined at payment."""

    def __init__(self) -> None:
        self.last = 0

    def next(self) -> dict[str, Any]:
        self.last += 1
        return {"id": self.last, "sku": "BOOK-1", "amount": "19.99"}


async def one_at_a_time(app: App, saga_type: str, n: int, orders: Orders) -> list[float]:
    """Run ``n`` sagas one after the other; the seconds each took from its start to its last
    journal entry (completed or failed). A remote saga is unloaded between its steps, so its
    end is found by reading the store every 10 ms: the journal's time keeps that wait out."""
    took = []
    for _ in range(n):
        began = time.time()  # the journal's clock (sagakit's system clock)
        handle = await app.start(saga_type, orders.next())
        await app.outcome(handle.id, poll=0.01)
        took.append((await app.journal(handle.id))[-1].at - began)
    return took


async def settled(app: App) -> int:
    counts = await app.store.counts()
    return sum(c for state, c in counts.items() if state in TERMINAL)


async def many_at_once(app: App, saga_type: str, n: int, in_flight: int, orders: Orders) -> float:
    """Run ``n`` sagas keeping ``in_flight`` of them going; return sagas/s. Ends are counted in
    the store every 5 ms (one query), for local and remote sagas alike."""
    base = await settled(app)
    started = done = 0
    began = moved = time.perf_counter()
    while done < n:
        room = min(in_flight - (started - done), n - started)
        if room > 0:
            await asyncio.gather(*(app.start(saga_type, orders.next()) for _ in range(room)))
            started += room
        else:
            await asyncio.sleep(0.005)
        done, before = await settled(app) - base, done
        if done > before:
            moved = time.perf_counter()
        elif time.perf_counter() - moved > 60:
            raise RuntimeError(f"no saga ended for 60 s ({done} of {n} ended)")
    return n / (time.perf_counter() - began)


async def measure(app: App, saga_type: str, args: argparse.Namespace) -> Figures:
    orders = Orders()
    await one_at_a_time(app, saga_type, args.warmup, orders)
    took = await one_at_a_time(app, saga_type, args.sagas, orders)
    sequential = len(took) / sum(took)  # back to back, each started as the last one ended
    cpu = time.process_time()
    rate = await many_at_once(app, saga_type, args.concurrent, args.in_flight, orders)
    cpu = (time.process_time() - cpu) / args.concurrent
    await check_outcomes(app, orders.last)
    cuts = statistics.quantiles(took, n=20)
    return Figures(sequential, rate, statistics.median(took), cuts[18], cpu)


async def check_outcomes(app: App, n: int) -> None:
    """Every saga ended, and as the orders say: one in ten failed, the others completed."""
    counts = await app.store.counts()
    want = {SagaState.COMPLETED: n - n // 10, SagaState.FAILED: n // 10}
    got = {SagaState(s): c for s, c in counts.items() if c}
    if got != want:
        raise RuntimeError(f"unexpected saga outcomes: {got}, wanted {want}")


async def measure_local(args: argparse.Namespace, backend: str) -> Figures:
    async with database(args, backend, "local") as url:
        app = App(url, poll_interval=args.poll_interval)
        app.register(ORDER_SAGA)
        async with app:
            return await measure(app, "OrderFulfillment", args)


async def measure_remote(args: argparse.Namespace, backend: str, broker: str) -> Figures:
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(database(args, backend, f"remote-{broker}"))
        broker_url = await stack.enter_async_context(namespace(broker))
        inboxes = {
            svc: await stack.enter_async_context(database(args, backend, f"{svc}-inbox"))
            for svc in SERVICES
        }
        services = services_apart if args.services == "process" else services_here
        await stack.enter_async_context(services(broker_url, inboxes))
        app = App(url, broker=broker_url, poll_interval=args.poll_interval)
        app.register(REMOTE_SAGA)
        await stack.enter_async_context(app)
        return await measure(app, "RemoteOrder", args)


# -- the outbox relay ---------------------------------------------------------------------------


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Silence a logger: an App without a broker logs an error for every command it writes."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


async def fill_outbox(url: str, n: int) -> None:
    """Start ``n`` remote sagas on an App without a broker; wait until their ``n`` first
    commands are in the outbox."""
    app = App(url)
    app.register(REMOTE_SAGA)
    orders = Orders()
    with quiet("sagakit.worker"):
        async with app:

            async def lane(count: int) -> None:
                for _ in range(count):
                    await app.start("RemoteOrder", orders.next())

            await asyncio.gather(*(lane(n // 64 + (i < n % 64)) for i in range(64)))
            while (await app.store.outbox_stats())[0] < n:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.05)


async def sql(url: str, statement: str) -> None:
    """Run one statement on sagakit's database: how the benchmark copies the outbox."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url[len("sqlite:///") :])
        try:
            with conn:
                conn.execute(statement)
        finally:
            conn.close()
        return
    import asyncpg

    base, schema = url.split("?schema=")
    conn_pg = await asyncpg.connect(base, server_settings={"search_path": schema})
    try:
        await conn_pg.execute(statement)
    finally:
        await conn_pg.close()


async def relay_all(url: str, broker: str, limit: float) -> tuple[int, float, int]:
    """Run an OutboxRelay until it has relayed the whole outbox, or for ``limit`` seconds at
    most; (commands relayed, seconds, commands left in the outbox)."""
    store = open_store(url)
    await store.open()
    try:
        total, _ = await store.outbox_stats()
        async with namespace(broker) as broker_url:
            target = open_broker(broker_url)
            await target.connect()
            relay = OutboxRelay(store, target)
            try:
                # A service group keeps the commands, as it would in production.
                await target.declare(FIRST_COMMAND, FIRST_SERVICE)
                began = time.perf_counter()
                relay.start()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(limit):
                        while relay.relayed < total:  # noqa: ASYNC110 - a counter, no event
                            await asyncio.sleep(0.002)
                elapsed = time.perf_counter() - began
            finally:
                await relay.stop()
                await target.close()
        return relay.relayed, elapsed, (await store.outbox_stats())[0]
    finally:
        await store.close()


async def measure_relay(args: argparse.Namespace, backend: str) -> dict[str, tuple[float, int]]:
    """Per broker: commands/s relaying the same ``args.outbox`` commands, and how many were
    left when ``args.relay_limit`` seconds ran out (0: all relayed)."""
    figures = {}
    async with database(args, backend, "outbox") as url:
        await fill_outbox(url, args.outbox)
        await sql(url, "CREATE TABLE bench_outbox AS SELECT * FROM sagakit_outbox")
        for i, broker in enumerate(args.brokers):
            if i:
                await sql(url, "DELETE FROM sagakit_outbox")
                await sql(url, "INSERT INTO sagakit_outbox SELECT * FROM bench_outbox")
            relayed, elapsed, left = await relay_all(url, broker, args.relay_limit)
            figures[broker] = (relayed / elapsed, left)
    return figures


# -- report -------------------------------------------------------------------------------------


def saga_table(args: argparse.Namespace, local: dict[str, Figures], rows: list[Any]) -> Table:
    where = "in this process" if args.services == "here" else "in another process"
    table = Table(title=f"4-step order saga: remote steps (services {where}) vs local steps")
    flight = args.in_flight
    for col in ("backend", "broker", "sagas/s 1", f"sagas/s {flight}", "p50 ms", "p95 ms",
                "CPU ms/saga", f"local / remote 1 | {flight}", "ms/step added"):  # fmt: skip
        table.add_column(col, justify="right")
    for backend, broker, f in rows:
        base = local[backend]
        ratios = f"{base.sequential / f.sequential:,.1f}x | {base.in_flight / f.in_flight:,.1f}x"
        added = f"{(f.p50 - base.p50) / 4 * 1e3:,.1f}"
        is_local = broker == "local"
        table.add_row(backend, broker, f"{f.sequential:,.0f}", f"{f.in_flight:,.0f}",
                      f"{f.p50 * 1e3:,.1f}", f"{f.p95 * 1e3:,.1f}", f"{f.cpu * 1e3:,.2f}",
                      "" if is_local else ratios, "" if is_local else added)  # fmt: skip
    return table


def relay_table(args: argparse.Namespace, relays: dict[str, dict[str, tuple[float, int]]]) -> Table:
    table = Table(title=f"Outbox relay: {args.outbox:,} commands, one OutboxRelay")
    for col in (
        "backend",
        "broker",
        "commands/s",
        "vs memory",
        f"left after {args.relay_limit:g} s",
    ):
        table.add_column(col, justify="right")
    for backend, figures in relays.items():
        floor = figures.get("memory", (0.0, 0))[0]
        for broker, (rate, left) in figures.items():
            ratio = f"{rate / floor:.2f}x" if floor else ""
            table.add_row(backend, broker, f"{rate:,.0f}", ratio, f"{left:,}")
    return table


NOTE = (
    "Sagas per row: {warm} warm-up; {seq} one at a time (p50/p95 from the start to the saga's "
    "last journal entry; sagas/s 1 = {seq} / their sum); then {conc} with {flight} in flight "
    "(sagas/s {flight}; CPU ms/saga: this process's CPU time over that phase, all threads, per "
    "saga, the services' included when they run in this process). Every 10th order is declined "
    "at payment and compensated (remotely for remote sagas). A remote step includes: the "
    "journal entry carrying its command (the outbox) and the saga's unload; the relay's claim, "
    "publish with the broker's confirmation, and delete; the service's inbox transaction (one "
    "per command; a SQLite file or PostgreSQL schema per service) and its reply's publish; the "
    "reply consumer's store write; the saga's claim and replay from its journal. local / "
    "remote: how many times more sagas/s the local-steps saga makes; ms/step added: (remote "
    "p50 - local p50) / 4. Every App polls every {poll} s (a stored reply wakes its worker at "
    "once; the poll is the fallback). Durable commits: SQLite synchronous=FULL, PostgreSQL "
    "synchronous_commit=on."
)
RELAY_NOTE = (
    "Relay: the same {outbox} commands relayed from the store to each broker by one "
    "OutboxRelay (claims of 200, published concurrently, each confirmed by the broker, then "
    "deleted), timed until the outbox is empty; vs memory: the rate over the in-memory broker's."
)


async def main(args: argparse.Namespace) -> None:
    console = Console(width=max(Console().width, 120))
    brokers = [b for b in args.brokers if not (args.services == "process" and b == "memory")]
    local: dict[str, Figures] = {}
    rows: list[tuple[str, str, Figures]] = []
    relays: dict[str, dict[str, tuple[float, int]]] = {}
    args.workdir = Path(tempfile.mkdtemp(prefix="sagakit-bench-remote-"))
    try:
        for backend in args.backends:
            console.print(f"· {backend}, local steps", highlight=False)
            local[backend] = await measure_local(args, backend)
            rows.append((backend, "local", local[backend]))
            for broker in brokers:
                console.print(f"· {backend}, remote steps over {broker}", highlight=False)
                rows.append((backend, broker, await measure_remote(args, backend, broker)))
            if args.outbox:
                console.print(f"· {backend}, outbox relay of {args.outbox:,}", highlight=False)
                relays[backend] = await measure_relay(args, backend)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    console.print(saga_table(args, local, rows))
    console.print(NOTE.format(seq=args.sagas, warm=args.warmup, conc=args.concurrent,
                              flight=args.in_flight, poll=args.poll_interval))  # fmt: skip
    if relays:
        console.print(relay_table(args, relays))
        console.print(RELAY_NOTE.format(outbox=f"{args.outbox:,}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sagas", type=int, default=40, help="sagas run one at a time")
    parser.add_argument("--concurrent", type=int, default=400, help="sagas run concurrently")
    parser.add_argument("--in-flight", type=int, default=64, help="sagas in flight at once")
    parser.add_argument("--warmup", type=int, default=10, help="sagas run before measuring")
    parser.add_argument("--outbox", type=int, default=5000, help="commands relayed (0: skip)")
    parser.add_argument("--relay-limit", type=float, default=10.0,
                        help="seconds the relay gets per broker")  # fmt: skip
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--brokers", nargs="+", default=list(BROKERS), choices=list(BROKERS))
    parser.add_argument("--services", choices=["here", "process"], default="here",
                        help="run the services in this process or in a child process")  # fmt: skip
    parser.add_argument("--poll-interval", type=float, default=0.05, help="App(poll_interval=)")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--serve", nargs=2, metavar=("BROKER", "INBOXES"), help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve:
        asyncio.run(serve(parsed.serve[0], json.loads(parsed.serve[1])))
    else:
        asyncio.run(main(parsed))
