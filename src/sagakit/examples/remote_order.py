"""Order fulfilment over messages: the OrderFulfillment saga with its four services as separate
processes, driven by an orchestrator through a real broker.

One command starts everything, runs the orders, prints what happened and stops it all::

    python -m sagakit.examples.remote_order --broker amqp://guest:guest@127.0.0.1:5672/
    python -m sagakit.examples.remote_order --broker nats://127.0.0.1:4222 --orders 50
    python -m sagakit.examples.remote_order --broker redis://127.0.0.1:6379/0 \\
        --db postgresql://postgres@127.0.0.1:5432/test

It starts ``InventoryService``, ``PaymentService``, ``ShippingService`` and
``NotificationService`` (``python -m sagakit.examples.remote_order service NAME ...``) and one
orchestrator worker (``... orchestrator ...``) as subprocesses that share nothing but the broker
(and the ledger file, for the accounting at the end). Each step of the saga is a command::

    reserve_inventory  InventoryService.ReserveItems           / .ReleaseReservation
    process_payment    PaymentService.ProcessPayment           / .RefundPayment
    create_shipment    ShippingService.CreateShipment          / .CancelShipment
    send_confirmation  NotificationService.SendOrderConfirmation / .SendCancellationNotice

Each service handles a command once per message id (its inbox, a SQLite file of its own in
the working directory) and applies an effect once per idempotency key (the
:class:`~sagakit.ledger.Ledger`). A compensation first closes the idempotency key of the action
it undoes, so that a copy of the action that arrives late (after a reply timeout) does nothing.
Cards are declined, carriers refuse parcels and the payment gateway glitches at the rates of
:class:`~sagakit.examples.order_fulfillment.Simulation`, drawn per order id.

With ``--broker memory://name`` everything runs in this one process. The run uses a broker
namespace of its own (``?prefix=``) and deletes it at the end, unless the URL names one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from rich.console import Console
from rich.table import Table

from sagakit import App, RetryPolicy, Saga, StepContext, step
from sagakit.codec import convert, decode
from sagakit.definition import Step
from sagakit.demo import Observer, ProgressObserver, QuietObserver
from sagakit.errors import BrokerError, DemoError, SagaNotFound
from sagakit.examples.order_fulfillment import (
    STEPS,
    Order,
    PaymentDeclined,
    ServiceUnavailable,
    ShipmentFailed,
    Simulation,
    sample_order,
)
from sagakit.handle import SagaInfo
from sagakit.journal import Entry, Kind, SagaState, project
from sagakit.ledger import Ledger, LedgerReport, Outcome
from sagakit.messaging import Broker, open_broker
from sagakit.messaging.options import redact, split_options
from sagakit.messaging.replies import GROUP as REPLY_GROUP
from sagakit.remote import DEFAULT_REPLY_TOPIC, RemoteStepFailed, remote
from sagakit.service import HandlerContext, Service

SAGA_TYPE = "RemoteOrderFulfillment"
SERVICES = ("InventoryService", "PaymentService", "ShippingService", "NotificationService")
COMMANDS = {  # step -> (action, compensation)
    "reserve_inventory": ("InventoryService.ReserveItems", "InventoryService.ReleaseReservation"),
    "process_payment": ("PaymentService.ProcessPayment", "PaymentService.RefundPayment"),
    "create_shipment": ("ShippingService.CreateShipment", "ShippingService.CancelShipment"),
    "send_confirmation": (
        "NotificationService.SendOrderConfirmation",
        "NotificationService.SendCancellationNotice",
    ),
}
SETTLED = frozenset({SagaState.COMPLETED, SagaState.FAILED, SagaState.NEEDS_ATTENTION})
DEMO_SIMULATION = Simulation(
    decline_rate=0.2, shipment_failure_rate=0.15, glitch_rate=0.15, latency=0.02
)
MODULE = "sagakit.examples.remote_order"
log = logging.getLogger(MODULE)


# -- the saga ----------------------------------------------------------------------------------


class _RemoteErrorType(type):
    """``isinstance(exc, T)`` is True for a failed reply whose handler raised one of
    ``T.error_types``: how a RetryPolicy retries a remote step on some errors only."""

    error_types: tuple[str, ...] = ()

    def __instancecheck__(cls, instance: object) -> bool:
        return isinstance(instance, RemoteStepFailed) and instance.error_type in cls.error_types


class GatewayGlitch(Exception, metaclass=_RemoteErrorType):
    """PaymentService answered ``ServiceUnavailable``: retried, unlike a declined card."""

    error_types = ("ServiceUnavailable",)


def remote_order_saga(*, timeout: float | None = 30.0) -> Saga:
    """The saga: four remote steps, each with its remote compensation; ``timeout`` is the
    seconds each command (and each compensation) waits for its reply."""
    payment_retry = RetryPolicy(max_attempts=3, initial_interval=0.05, retry_on=(GatewayGlitch,))
    # A service that was away comes back: its compensations are retried for a while.
    undo_retry = RetryPolicy(max_attempts=8, initial_interval=0.2, max_interval=5.0)

    def remote_step(name: str, retry: RetryPolicy | None = None) -> Step:
        action, compensation = COMMANDS[name]
        return step(name, remote(action), compensate=remote(compensation), retry=retry,
                    compensate_retry=undo_retry, timeout=timeout)  # fmt: skip

    return Saga(
        SAGA_TYPE,
        steps=[
            remote_step("reserve_inventory"),
            remote_step("process_payment", payment_retry),
            remote_step("create_shipment"),
            remote_step("send_confirmation"),
        ],
        input_type=Order,
    )


def create_app(
    url: str | None = None,
    *,
    broker: str | Broker | None,
    reply_topic: str = DEFAULT_REPLY_TOPIC,
    timeout: float | None = 30.0,
    worker: bool | None = None,
    concurrency: int = 200,
    poll_interval: float = 0.2,
) -> App:
    """An App with the RemoteOrderFulfillment saga; a worker App (``worker`` not False)
    relays its commands to ``broker`` and consumes the replies on ``reply_topic``."""
    app = App(url, broker=broker, reply_topic=reply_topic, worker=worker,
              max_concurrency=concurrency, poll_interval=poll_interval)  # fmt: skip
    app.register(remote_order_saga(timeout=timeout))
    return app


# -- the services ------------------------------------------------------------------------------


def _call(ctx: HandlerContext) -> StepContext:
    """What the ledger records of a command: its saga, step, attempt and idempotency key."""
    return StepContext(
        saga_id=ctx.saga_id or "",
        saga_type=ctx.headers.get("saga_type", ""),
        step=ctx.step or "",
        attempt=ctx.attempt,
        idempotency_key=ctx.idempotency_key or ctx.message_id,
        results={},
    )


class Desk:
    """Where a service applies its effects: through the ledger, once per idempotency key.

    A call is described by a :class:`~sagakit.StepContext` (saga, step, attempt, key), as the
    ledger records it, whether a command or an event asked for it.
    """

    def __init__(self, service: str, ledger: Ledger, sim: Simulation) -> None:
        self.service, self.ledger, self.sim = service, ledger, sim

    def _pause(self) -> None:
        if self.sim.latency:
            time.sleep(random.uniform(0, self.sim.latency / 2))

    def act(
        self,
        call: StepContext,
        order: Order,
        operation: str,
        decide: Callable[[], Outcome],
        *,
        failure: type[Exception] = RuntimeError,
        unavailable: bool = False,
    ) -> dict[str, Any]:
        """Perform ``operation``: its stored result if its key has one; ``failure`` for a
        business failure, :class:`ServiceUnavailable` (nothing done) if ``unavailable``."""
        op = f"{self.service}.{operation}"
        self.ledger.record_call(call, order_id=order.order_id, operation=op, compensation=False)
        self._pause()
        if unavailable:
            raise ServiceUnavailable(f"{op} timed out (attempt {call.attempt}); nothing was done")
        outcome = self.ledger.apply_once(call, order_id=order.order_id, operation=op,
                                         compensation=False, decide=decide)  # fmt: skip
        if not outcome.ok:
            raise failure(outcome.error)
        return outcome.result or {}

    def undo(self, call: StepContext, order: Order, action: str) -> dict[str, Any]:
        """Undo ``action`` of the call's step if it took effect. The action's key is closed
        first, so a late copy of the action (its reply timed out) finds it cancelled and does
        nothing."""
        op = f"{self.service}.{UNDO[action]}"
        self.ledger.record_call(call, order_id=order.order_id, operation=op, compensation=True)
        self._pause()
        did = self.ledger.apply_once(
            replace(call, idempotency_key=f"{call.saga_id}/{call.step}"),
            order_id=order.order_id, operation=f"{self.service}.{action}", compensation=False,
            decide=lambda: Outcome(ok=False, error="cancelled before it ran"),
        )  # fmt: skip
        if not did.ok:
            return {"undone": False, "why": f"{action} had no effect ({did.error})"}
        undone = Outcome(ok=True, result={"undone": True})
        outcome = self.ledger.apply_once(call, order_id=order.order_id, operation=op,
                                         compensation=True, decide=lambda: undone)  # fmt: skip
        return outcome.result or {}

    # -- the business of the four services, shared with the choreographed example ----------

    def reserve(self, call: StepContext, order: Order) -> dict[str, Any]:
        units = sum(i.quantity for i in order.items)
        result = {"reservation_id": _new_id("RSV"), "units": units}
        return self.act(call, order, "ReserveItems", lambda: Outcome(ok=True, result=result))

    def charge(self, call: StepContext, order: Order) -> dict[str, Any]:
        """Raises :class:`PaymentDeclined`, or :class:`ServiceUnavailable` on the first attempt
        for an order whose gateway glitches."""
        declined, _, glitch = self.sim.fate(order.order_id)

        def decide() -> Outcome:
            if declined:
                return Outcome(ok=False, error=f"card {order.payment_method} declined")
            return Outcome(ok=True, result={"payment_id": _new_id("PAY"),
                                            "amount": str(order.total)})  # fmt: skip

        return self.act(call, order, "ProcessPayment", decide, failure=PaymentDeclined,
                        unavailable=glitch and call.attempt == 1)  # fmt: skip

    def ship(self, call: StepContext, order: Order) -> dict[str, Any]:
        """Raises :class:`ShipmentFailed` when no carrier takes the parcel."""
        _, fails, _ = self.sim.fate(order.order_id)

        def decide() -> Outcome:
            if fails:
                return Outcome(ok=False, error=f"no carrier delivers to {order.shipping_address}")
            return Outcome(ok=True, result={"shipment_id": _new_id("SHP"), "carrier": "Parcelo"})

        return self.act(call, order, "CreateShipment", decide, failure=ShipmentFailed)

    def confirm(self, call: StepContext, order: Order) -> dict[str, Any]:
        result = {"message_id": _new_id("MSG")}
        return self.act(
            call, order, "SendOrderConfirmation", lambda: Outcome(ok=True, result=result)
        )


ACTIONS = {  # a service -> its action; UNDO names the compensation
    "InventoryService": "ReserveItems",
    "PaymentService": "ProcessPayment",
    "ShippingService": "CreateShipment",
    "NotificationService": "SendOrderConfirmation",
}
UNDO = {
    "ReserveItems": "ReleaseReservation",
    "ProcessPayment": "RefundPayment",
    "CreateShipment": "CancelShipment",
    "SendOrderConfirmation": "SendCancellationNotice",
}


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _build(service: Service, desk: Desk) -> None:
    """Register the service's two commands: its action and the compensation."""
    action = ACTIONS[service.name]
    perform = {
        "ReserveItems": desk.reserve,
        "ProcessPayment": desk.charge,
        "CreateShipment": desk.ship,
        "SendOrderConfirmation": desk.confirm,
    }[action]

    @service.handles(action, input_type=Order)
    def act(ctx: HandlerContext, order: Order) -> dict[str, Any]:
        return perform(_call(ctx), order)

    @service.handles(UNDO[action])
    def undo(ctx: HandlerContext, data: dict[str, Any]) -> dict[str, Any]:
        order: Order = convert(data["input"], Order)  # data: {"input": order, "result": ...}
        return desk.undo(_call(ctx), order, action)


def create_services(
    broker: Broker | str,
    *,
    ledger_path: str | os.PathLike[str],
    inbox_dir: str | os.PathLike[str] | None = None,
    inboxes: Mapping[str, str] | None = None,
    simulation: Simulation = DEMO_SIMULATION,
    names: Iterable[str] = SERVICES,
    retry_delay: float = 0.2,
) -> list[Service]:
    """The services ``names`` (all four by default), not started.

    Args:
        broker: a Broker shared by the services (its owner connects and closes it) or a URL
            (each service opens its own connection).
        ledger_path: the ledger file every service records its effects in.
        inbox_dir: where each service keeps its inbox ``<name>-inbox.db`` (default: the
            current directory), unless ``inboxes`` gives its database URL.
        simulation: declines, shipment failures, glitches and latency.
    """
    ledger = Ledger(ledger_path)
    where = Path(inbox_dir or ".")
    made = []
    for name in names:
        if name not in SERVICES:
            raise DemoError(f"unknown service {name!r}; the services are {', '.join(SERVICES)}")
        inbox = (inboxes or {}).get(name) or f"sqlite:///{where / f'{name}-inbox.db'}"
        service = Service(name, broker=broker, inbox=inbox, retry_delay=retry_delay)
        _build(service, Desk(name, ledger, simulation))
        made.append(service)
    return made


def command_queues(reply_topic: str = DEFAULT_REPLY_TOPIC) -> list[tuple[str, str]]:
    """(topic, group) of every durable subscription a run makes."""
    commands = [c for pair in COMMANDS.values() for c in pair]
    return [(c, c.split(".", 1)[0]) for c in commands] + [(reply_topic, REPLY_GROUP)]


# -- running it: processes, a summary ----------------------------------------------------------


def with_prefix(url: str) -> tuple[str, bool]:
    """``url`` with a broker namespace of its own (``?prefix=``), and whether it was added."""
    if "prefix" in dict(parse_qsl(urlsplit(url).query)):
        return url, False
    sep = "&" if urlsplit(url).query else ("" if url.endswith("?") else "?")
    return f"{url}{sep}prefix=run{uuid.uuid4().hex[:10]}", True


async def declare_queues(url: str, queues: Iterable[tuple[str, str]]) -> None:
    """Make the durable subscriptions (topic, group) of a run exist before anything is sent,
    so that no message waits for a process that has not subscribed yet; raise
    :class:`DemoError` with the reason if the broker does not answer."""
    broker = open_broker(url)
    try:
        await broker.connect()
        for topic, group in queues:
            await broker.declare(topic, group)
    except (BrokerError, ImportError) as exc:
        raise DemoError(f"cannot use the broker: {exc}") from exc
    finally:
        await broker.close()


async def forget_namespace(url: str, queues: Iterable[tuple[str, str]]) -> None:
    """Delete what a run left on the broker under its prefix (best effort): the RabbitMQ
    queues ``<prefix>.<group>.<topic>`` and exchange, the JetStream stream, the Redis streams."""
    driver_url, options = split_options(url)
    prefix, scheme = options.prefix, urlsplit(url).scheme
    try:
        if scheme in ("amqp", "amqps"):
            import aio_pika

            connection = await aio_pika.connect(driver_url, timeout=5)
            async with connection:
                channel = await connection.channel()
                for topic, group in queues:
                    await channel.queue_delete(f"{prefix}.{group}.{topic}")
                await channel.exchange_delete(prefix)
        elif scheme in ("nats", "tls"):
            import nats

            nc = await nats.connect(driver_url, connect_timeout=2, max_reconnect_attempts=0)
            try:
                await nc.jetstream().delete_stream(prefix)
            finally:
                await nc.close()
        elif scheme in ("redis", "rediss"):
            from redis.asyncio import Redis

            client = Redis.from_url(driver_url)
            try:
                keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
                if keys:
                    await client.delete(*keys)
            finally:
                await client.aclose()
    except Exception as exc:  # leftovers are harmless: another run uses another prefix
        log.warning("could not delete broker namespace %s: %s", prefix, exc)


class Fleet(Protocol):
    """The processes (or in-process tasks) of a run."""

    async def start(self) -> None: ...

    def check(self) -> None:
        """Raise :class:`DemoError` if a part stopped on its own."""

    async def stop(self) -> None: ...


@dataclass
class Child:
    """One subprocess of a run, its output in a log file of the working directory."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        # S603: this interpreter running this package's own module with our arguments.
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT)  # noqa: S603

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(f"{self.name} exited on its own (code {self.proc.returncode}); "
                            f"its log {self.log_path}:\n{self.tail()}")  # fmt: skip

    async def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()

    def tail(self, limit: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-limit:]


@dataclass
class Processes:
    """Subprocesses started in order and stopped in reverse order."""

    children: list[Child]
    observer: Observer = field(default_factory=QuietObserver)

    async def start(self) -> None:
        for child in self.children:
            child.start()
            pid = child.proc.pid if child.proc else "?"
            self.observer.event(f"started {child.name} (pid {pid})")

    def check(self) -> None:
        for child in self.children:
            child.check()

    async def stop(self) -> None:
        for child in reversed(self.children):
            await child.stop()
        self.observer.event(f"stopped {len(self.children)} processes (SIGTERM)")


def module_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """One run of the example.

    Attributes:
        broker: the broker URL; a namespace of its own is added unless it names a prefix.
        db: the orchestrator's database (default ``sqlite:///<workdir>/orders.db``).
        orders: orders to start.
        workdir: where the database, ledger, inboxes and logs go (default: a new temporary
            directory, left for a look afterwards).
        simulation: declines, shipment failures, gateway glitches, latency.
        step_timeout: seconds each command waits for its reply.
        timeout: seconds to wait for every saga to settle.
    """

    broker: str
    db: str | None = None
    orders: int = 20
    workdir: Path | None = None
    simulation: Simulation = DEMO_SIMULATION
    step_timeout: float = 30.0
    timeout: float = 120.0


def sim_args(sim: Simulation) -> list[str]:
    return ["--decline-rate", str(sim.decline_rate), "--shipment-failure-rate",
            str(sim.shipment_failure_rate), "--glitch-rate", str(sim.glitch_rate),
            "--latency", str(sim.latency)]  # fmt: skip


def prepare_workdir(workdir: Path | None, files: Sequence[str]) -> Path:
    """The working directory, created, without the files of an earlier run."""
    where = (workdir or Path(tempfile.mkdtemp(prefix="sagakit-run-"))).resolve()
    where.mkdir(parents=True, exist_ok=True)
    for name in files:
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{where / name}{suffix}").unlink(missing_ok=True)
    return where


class _InProcess:
    """The services and the orchestrator as tasks of this process (memory:// brokers)."""

    def __init__(self, url: str, db: str, config: RunConfig, workdir: Path) -> None:
        self.services = create_services(
            url, ledger_path=workdir / "ledger.db", inbox_dir=workdir, simulation=config.simulation
        )
        self.app = create_app(db, broker=url, worker=True, timeout=config.step_timeout)

    async def start(self) -> None:
        for service in self.services:
            await service.start()
        await self.app.open()

    def check(self) -> None:
        pass

    async def stop(self) -> None:
        await self.app.close()
        for service in self.services:
            await service.close()


def _fleet(url: str, db: str, config: RunConfig, workdir: Path, observer: Observer) -> Fleet:
    if urlsplit(url).scheme == "memory":
        return _InProcess(url, db, config, workdir)
    me = MODULE
    common = ["--broker", url]
    children = [
        Child(name, module_argv(me, "service", name, *common, "--workdir", str(workdir),
                                *sim_args(config.simulation)),
              workdir / f"{name}.log")
        for name in SERVICES
    ]  # fmt: skip
    orchestrator = module_argv(me, "orchestrator", *common, "--db", db,
                               "--step-timeout", str(config.step_timeout))  # fmt: skip
    children.append(Child("orchestrator", orchestrator, workdir / "orchestrator.log"))
    return Processes(children, observer)


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """What a run did, checked against the ledger and the journals."""

    title: str
    orders: int
    states: Counter[SagaState]
    reasons: Mapping[SagaState, Counter[str]]  # why sagas failed or need attention
    ledger: LedgerReport
    mismatches: list[str]
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # extra information
    hint: str = ""

    @property
    def unsettled(self) -> int:
        return self.orders - sum(self.states.get(s, 0) for s in SETTLED)

    def violations(self) -> list[str]:
        """Every broken promise, as a sentence; empty when all is well."""
        found = []
        if self.unsettled:
            found.append(f"{self.unsettled} sagas did not settle")
        if self.ledger.applied_twice:
            found.append(f"effects applied twice: {self.ledger.applied_twice[:5]}")
        if self.ledger.unbalanced:
            found.append(f"ledger does not match saga states: {self.ledger.unbalanced[:5]}")
        if self.mismatches:
            found.append(f"saga rows differ from their journal: {self.mismatches[:5]}")
        return found


def _ok(value: int) -> str:
    return "0 ✓" if value == 0 else f"{value} ✗"


def _reasons(table: Table, reasons: Counter[str] | None) -> None:
    for reason, n in sorted((reasons or Counter()).items()):
        table.add_row(f"  {reason}", str(n), "")


def render(summary: Summary, console: Console) -> None:
    """Print the summary table (and where to look next)."""
    console.print(summary.title, soft_wrap=True)
    table = Table("outcome", "count", "")
    table.columns[1].justify = "right"
    count = summary.states.get
    table.add_row("completed", str(count(SagaState.COMPLETED, 0)), "every step done")
    table.add_row("compensated (failed)", str(count(SagaState.FAILED, 0)),
                  "undone in reverse order")  # fmt: skip
    _reasons(table, summary.reasons.get(SagaState.FAILED))
    table.add_row("needs_attention", str(count(SagaState.NEEDS_ATTENTION, 0)), "")
    _reasons(table, summary.reasons.get(SagaState.NEEDS_ATTENTION))
    table.add_row("not settled", _ok(summary.unsettled), "must be 0")
    for row in summary.rows:
        table.add_row(*row)
    table.add_row("effects applied twice", _ok(len(summary.ledger.applied_twice)), "must be 0")
    table.add_row("orders the ledger disagrees with", _ok(len(summary.ledger.unbalanced)),
                  "must be 0")  # fmt: skip
    table.add_row("saga rows ≠ their journal", _ok(len(summary.mismatches)), "must be 0")
    console.print(table)
    if summary.hint:
        console.print(summary.hint, soft_wrap=True)


async def settle(
    reader: App,
    ids: Sequence[str],
    *,
    timeout: float,
    fleet: Fleet,
    observer: Observer,
    done: frozenset[SagaState] = SETTLED,
) -> None:
    """Wait until every saga of ``ids`` is in ``done`` (or ``timeout`` passed)."""
    waiting, deadline = set(ids), time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        fleet.check()
        for saga_id in list(waiting):
            with contextlib.suppress(SagaNotFound):  # a tracked saga appears with its first event
                if (await reader.get(saga_id)).state in done:
                    waiting.discard(saga_id)
        observer.update(len(ids) - len(waiting), len(ids))
        if waiting:
            await asyncio.sleep(0.2)


@dataclass(frozen=True, slots=True, kw_only=True)
class Audit:
    """Sagas read back after a run: their rows and journals, the ledger's verdict, the sagas
    whose row is not the projection of their journal, and why the unsuccessful ones are so."""

    infos: dict[str, SagaInfo]
    journals: dict[str, list[Entry]]
    ledger: LedgerReport
    mismatches: list[str]
    reasons: dict[SagaState, Counter[str]]

    @property
    def states(self) -> Counter[SagaState]:
        return Counter(info.state for info in self.infos.values())

    def count(self, *kinds: Kind) -> int:
        """Journal entries of ``kinds`` over every saga."""
        return sum(e.kind in kinds for entries in self.journals.values() for e in entries)


async def audit(
    reader: App,
    ids: Sequence[str],
    ledger: Ledger,
    reason: Callable[[SagaInfo, list[Entry]], str],
) -> Audit:
    """Read every saga of ``ids`` and its journal back and check them against ``ledger``;
    ``reason`` says why a failed (or parked) saga is so."""
    infos, journals, mismatches = {}, {}, []
    reasons: dict[SagaState, Counter[str]] = {}
    for saga_id in ids:
        with contextlib.suppress(SagaNotFound):  # a tracked flow whose first event was lost
            info = infos[saga_id] = await reader.get(saga_id)
            entries = journals[saga_id] = await reader.journal(saga_id)
            p = project(entries)
            if (info.state, info.current_step, info.output, info.error) != (
                p.state, p.current_step, decode(p.output), p.error
            ) or [e.index for e in entries] != list(range(len(entries))):  # fmt: skip
                mismatches.append(saga_id)
            if info.state in (SagaState.FAILED, SagaState.NEEDS_ATTENTION):
                reasons.setdefault(info.state, Counter())[reason(info, entries)] += 1
    states = {i: info.state for i, info in infos.items()}
    return Audit(infos=infos, journals=journals, ledger=ledger.check(states, STEPS, journals),
                 mismatches=mismatches, reasons=reasons)  # fmt: skip


def _parts(url: str, services: str = "4 services + 1 orchestrator") -> str:
    if urlsplit(url).scheme == "memory":
        return f"{services}, in this process"
    return services.replace("services", "service processes")


def failure_reason(info: SagaInfo, journal: list[Entry]) -> str:
    """``at <step>: <what the service raised>`` for a failed remote saga."""
    if info.state is SagaState.NEEDS_ATTENTION:
        return str((info.error or {}).get("type"))
    failed = next((e for e in journal if e.kind is Kind.STEP_FAILED), None)
    if failed is None:
        return "other"
    error = failed.error or {}
    what = str(error.get("type"))
    if what == "RemoteStepFailed":  # "<command> failed in its service: <type>: <message>"
        what = str(error.get("message", "")).split(": ")[1]
    elif what == "StepTimedOut":
        what = "no reply in time"
    return f"at {failed.step}: {what}"


async def run(config: RunConfig, observer: Observer | None = None) -> Summary:
    """Run the example end to end (see the module docstring) and return its summary."""
    observer = observer or QuietObserver()
    files = ["orders.db", "ledger.db", *(f"{s}-inbox.db" for s in SERVICES)]
    workdir = prepare_workdir(config.workdir, files)
    url, own_namespace = with_prefix(config.broker)
    # The outbox relay does not declare a command's group before its first publish (as
    # messaging.base promises), so a command sent before its service ran would be dropped.
    await declare_queues(url, command_queues())
    db = config.db or f"sqlite:///{workdir / 'orders.db'}"
    run_id = uuid.uuid4().hex[:8]
    started = time.monotonic()
    fleet = _fleet(url, db, config, workdir, observer)
    try:
        async with create_app(db, broker=None, worker=False) as client:
            try:
                await fleet.start()
                handles = [
                    await client.start(SAGA_TYPE, order,
                                       idempotency_key=f"{run_id}/{order.order_id}")
                    for order in map(sample_order, range(1, config.orders + 1))
                ]  # fmt: skip
                observer.event(f"started {config.orders} orders")
                ids = [h.id for h in handles]
                await settle(client, ids, timeout=config.timeout, fleet=fleet, observer=observer)
            finally:
                await fleet.stop()
            found = await audit(client, ids, Ledger(workdir / "ledger.db"), failure_reason)
    finally:
        if own_namespace:
            await forget_namespace(url, command_queues())
    late = found.ledger.committed_reruns
    return Summary(
        title=f"{config.orders} orders over {redact(config.broker)}: {_parts(url)}, "
        f"{time.monotonic() - started:.1f} s",
        orders=config.orders,
        states=found.states,
        reasons=found.reasons,
        ledger=found.ledger,
        mismatches=found.mismatches,
        rows=[
            (
                "commands sent",
                str(found.count(Kind.STEP_STARTED, Kind.COMPENSATION_STARTED)),
                "through the outbox",
            ),
            ("payment retries", str(found.count(Kind.STEP_RETRYING)), "gateway glitches"),
            (
                "commands handled after their step ended",
                str(late),
                "late, after a reply timeout: no effect" if late else "",
            ),
        ],
        hint=f"files in {workdir}; try: sagakit list --db {shlex.quote(db)}",
    )


# -- the command line --------------------------------------------------------------------------


def add_simulation_options(parser: argparse.ArgumentParser) -> None:
    sim = DEMO_SIMULATION
    parser.add_argument("--decline-rate", type=float, default=sim.decline_rate)
    parser.add_argument("--shipment-failure-rate", type=float, default=sim.shipment_failure_rate)
    parser.add_argument("--glitch-rate", type=float, default=sim.glitch_rate)
    parser.add_argument("--latency", type=float, default=sim.latency,
                        help="seconds a service call takes at most")  # fmt: skip


def simulation_of(args: argparse.Namespace) -> Simulation:
    return Simulation(decline_rate=args.decline_rate, latency=args.latency,
                      shipment_failure_rate=args.shipment_failure_rate,
                      glitch_rate=args.glitch_rate)  # fmt: skip


async def wait_for_sigterm() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(name: str, broker: str, workdir: Path, sim: Simulation) -> None:
    """Run one service until SIGTERM."""
    (service,) = create_services(broker, ledger_path=workdir / "ledger.db", inbox_dir=workdir,
                                 simulation=sim, names=[name])  # fmt: skip
    async with service:
        log.info("%s ready", name)
        await wait_for_sigterm()


async def orchestrate(broker: str, db: str, step_timeout: float) -> None:
    """Run the orchestrator worker until SIGTERM."""
    async with create_app(db, broker=broker, worker=True, timeout=step_timeout):
        log.info("orchestrator ready")
        await wait_for_sigterm()


def _role(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE} {argv[0]}")
    parser.add_argument("--broker", required=True)
    if argv[0] == "service":
        parser.add_argument("name", choices=SERVICES)
        parser.add_argument("--workdir", type=Path, required=True)
        add_simulation_options(parser)
    else:
        parser.add_argument("--db", required=True)
        parser.add_argument("--step-timeout", type=float, default=30.0)
    args = parser.parse_args(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if argv[0] == "service":
        asyncio.run(serve(args.name, args.broker, args.workdir, simulation_of(args)))
    else:
        asyncio.run(orchestrate(args.broker, args.db, args.step_timeout))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sagakit.examples.remote_order --broker URL [--db URL] [--orders N]``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in ("service", "orchestrator"):
        return _role(args_list)
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="Order fulfilment with four service processes and an orchestrator, over "
        "a broker: runs N orders, prints a summary, stops everything.",
    )
    parser.add_argument("--broker", required=True, help="amqp://..., nats://..., redis://...")
    parser.add_argument("--db", help="the orchestrator's database (default: SQLite in workdir)")
    parser.add_argument("--orders", type=int, default=20)
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--step-timeout", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    add_simulation_options(parser)
    args = parser.parse_args(args_list)
    config = RunConfig(broker=args.broker, db=args.db, orders=args.orders, workdir=args.workdir,
                       simulation=simulation_of(args), step_timeout=args.step_timeout,
                       timeout=args.timeout)  # fmt: skip
    return run_and_report(lambda observer: run(config, observer))


def run_and_report(go: Callable[[Observer], Coroutine[Any, Any, Summary]]) -> int:
    """Run with a progress bar, print the summary; exit 0 if every promise held."""
    logging.basicConfig(level=logging.ERROR)  # the services log to their own files
    console = Console(highlight=False)
    with ProgressObserver(console) as observer:
        try:
            summary = asyncio.run(go(observer))
        except DemoError as exc:
            observer.stop()
            console.print(f"error: {exc}", markup=False, soft_wrap=True)
            return 2
    render(summary, console)
    problems = summary.violations()
    for problem in problems:
        console.print(f"FAILED: {problem}", markup=False)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
