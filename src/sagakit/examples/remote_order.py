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
import logging
import shlex
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sagakit import App, RetryPolicy, Saga, step
from sagakit.definition import Step
from sagakit.demo import Observer, QuietObserver
from sagakit.examples.order_fulfillment import Order, Simulation, sample_order
from sagakit.examples.remote_services import ACTIONS, SERVICES, UNDO, Desk, create_services
from sagakit.examples.runner import (
    DEMO_SIMULATION,
    SETTLED,
    Audit,
    Child,
    Fleet,
    Processes,
    Summary,
    add_simulation_options,
    audit,
    declare_queues,
    forget_namespace,
    module_argv,
    prepare_workdir,
    render,
    run_and_report,
    settle,
    sim_args,
    simulation_of,
    wait_for_sigterm,
    with_prefix,
)
from sagakit.handle import SagaInfo
from sagakit.journal import Entry, Kind, SagaState
from sagakit.ledger import Ledger
from sagakit.messaging import Broker
from sagakit.messaging.options import redact
from sagakit.messaging.replies import GROUP as REPLY_GROUP
from sagakit.remote import DEFAULT_REPLY_TOPIC, RemoteStepFailed, remote

# The services and the run machinery live in remote_services and runner; their names stay
# importable from here, where the tests and the users of this example find them.
__all__ = [
    "ACTIONS", "COMMANDS", "DEMO_SIMULATION", "MODULE", "SAGA_TYPE", "SERVICES", "SETTLED",
    "UNDO", "Audit", "Child", "Desk", "Fleet", "GatewayGlitch", "Processes", "RunConfig",
    "Summary", "add_simulation_options", "audit", "command_queues", "create_app",
    "create_services", "declare_queues", "failure_reason", "forget_namespace", "main",
    "module_argv", "orchestrate", "prepare_workdir", "remote_order_saga", "render", "run",
    "run_and_report", "serve", "settle", "sim_args", "simulation_of", "wait_for_sigterm",
    "with_prefix"
]  # fmt: skip

SAGA_TYPE = "RemoteOrderFulfillment"
COMMANDS = {  # step -> (action, compensation)
    "reserve_inventory": ("InventoryService.ReserveItems", "InventoryService.ReleaseReservation"),
    "process_payment": ("PaymentService.ProcessPayment", "PaymentService.RefundPayment"),
    "create_shipment": ("ShippingService.CreateShipment", "ShippingService.CancelShipment"),
    "send_confirmation": (
        "NotificationService.SendOrderConfirmation",
        "NotificationService.SendCancellationNotice",
    ),
}
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


def command_queues(reply_topic: str = DEFAULT_REPLY_TOPIC) -> list[tuple[str, str]]:
    """(topic, group) of every durable subscription a run makes."""
    commands = [c for pair in COMMANDS.values() for c in pair]
    return [(c, c.split(".", 1)[0]) for c in commands] + [(reply_topic, REPLY_GROUP)]


# -- running it --------------------------------------------------------------------------------


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


if __name__ == "__main__":
    sys.exit(main())
