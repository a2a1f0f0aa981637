"""Order fulfilment as a choreography: five services that react to each other's events, with no
orchestrator, and a tracker that follows each order's flow as a saga of type
``OrderChoreography``.

One command starts the services, runs the orders, prints what happened and stops it all::

    python -m sagakit.examples.choreographed_order --broker amqp://guest:guest@127.0.0.1:5672/
    python -m sagakit.examples.choreographed_order --broker nats://127.0.0.1:4222 --orders 50
    # no ShippingService: every flow that gets that far stalls, and the tracker flags it
    python -m sagakit.examples.choreographed_order --broker redis://127.0.0.1:6379/0 \\
        --without ShippingService --deadline 2

The flow. ``OrderService`` hears what happened and asks for what comes next; the other four do
the work and say how it went::

    OrderCreated -> ReserveInventory -> InventoryReserved -> ProcessPayment
      -> PaymentProcessed -> ShipOrder -> OrderShipped -> SendConfirmation -> ConfirmationSent
      -> OrderCompleted
    PaymentFailed  -> ReleaseInventory -> InventoryReleased -> OrderCancelled
    ShipmentFailed -> RefundPayment -> PaymentRefunded -> ReleaseInventory -> InventoryReleased
      -> OrderCancelled

Each service is an :class:`~sagakit.choreography.EventBus` with an inbox of its own (a SQLite
file in the working directory), so it handles each event once however often it is delivered,
and applies its effects through the same :class:`~sagakit.ledger.Ledger` as the orchestrated
examples. The :class:`~sagakit.tracker.Tracker` records every event of an order in one saga
(``sagakit show <id>``): completed on ``OrderCompleted``, compensating on ``PaymentFailed`` or
``ShipmentFailed`` until the events that undo what was done (``InventoryReleased``,
``PaymentRefunded``) came, and ``needs_attention`` when a flow makes no progress for
``--deadline`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagakit import App, StepContext
from sagakit.choreography import EventBus, EventContext
from sagakit.codec import convert
from sagakit.demo import Observer, QuietObserver
from sagakit.errors import DemoError
from sagakit.examples.order_fulfillment import (
    Order,
    PaymentDeclined,
    ShipmentFailed,
    Simulation,
    sample_order,
)
from sagakit.examples.remote_services import Desk
from sagakit.examples.runner import (
    DEMO_SIMULATION,
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
from sagakit.tracker import Tracker

SAGA_TYPE = "OrderChoreography"
MODULE = "sagakit.examples.choreographed_order"
SERVICES = (
    "OrderService",
    "InventoryService",
    "PaymentService",
    "ShippingService",
    "NotificationService",
)
ROUTES = {  # OrderService: what happened -> what to ask for next
    "OrderCreated": "ReserveInventory",
    "InventoryReserved": "ProcessPayment",
    "PaymentProcessed": "ShipOrder",
    "OrderShipped": "SendConfirmation",
    "ConfirmationSent": "OrderCompleted",
    "PaymentFailed": "ReleaseInventory",
    "ShipmentFailed": "RefundPayment",
    "PaymentRefunded": "ReleaseInventory",
    "InventoryReleased": "OrderCancelled",
}
HANDLES = {  # service -> the events it handles
    "OrderService": tuple(ROUTES),
    "InventoryService": ("ReserveInventory", "ReleaseInventory"),
    "PaymentService": ("ProcessPayment", "RefundPayment"),
    "ShippingService": ("ShipOrder",),
    "NotificationService": ("SendConfirmation",),
}
STEPS = (
    "ReserveInventory",
    "InventoryReserved",
    "ProcessPayment",
    "PaymentProcessed",
    "ShipOrder",
    "OrderShipped",
    "SendConfirmation",
    "ConfirmationSent",
)
COMPENSATIONS = {"InventoryReserved": "InventoryReleased", "PaymentProcessed": "PaymentRefunded"}
log = logging.getLogger(MODULE)


def create_tracker(
    db: str,
    broker: Broker | str,
    *,
    deadline: float = 10.0,
    check_interval: float | None = None,
) -> Tracker:
    """The tracker of the flow: every order's events in one ``OrderChoreography`` saga of
    sagakit's database ``db``, parked in ``needs_attention`` after ``deadline`` quiet seconds."""
    return Tracker(
        db,
        broker,
        saga_type=SAGA_TYPE,
        starts="OrderCreated",
        steps=STEPS,
        completes=["OrderCompleted"],
        fails=["PaymentFailed", "ShipmentFailed"],
        compensations=COMPENSATIONS,
        events=["ReleaseInventory", "RefundPayment", "OrderCancelled"],
        deadline=deadline,
        check_interval=check_interval,
        retry_delay=0.2,
    )


# -- the services ------------------------------------------------------------------------------


def _call(event: EventContext, step: str, *, attempt: int = 1, undo: bool = False) -> StepContext:
    """What the ledger records of an event's work: the flow, the step of the orchestrated
    saga it corresponds to, and an idempotency key made of both."""
    key = f"{event.saga_id}/{step}" + ("/compensate" if undo else "")
    return StepContext(saga_id=event.saga_id or "", saga_type=SAGA_TYPE, step=step,
                       attempt=attempt, idempotency_key=key, results={})  # fmt: skip


def _order(data: Mapping[str, Any]) -> Order:
    order: Order = convert(data["order"], Order)
    return order


def _orders(bus: EventBus, desk: Desk) -> None:
    def route(heard: str, then: str) -> None:
        @bus.on(heard)
        def forward(event: EventContext, data: dict[str, Any]) -> None:
            event.publish(then, data)

    for heard, then in ROUTES.items():
        route(heard, then)


def _inventory(bus: EventBus, desk: Desk) -> None:
    @bus.on("ReserveInventory")
    def reserve(event: EventContext, data: dict[str, Any]) -> None:
        reservation = desk.reserve(_call(event, "reserve_inventory"), _order(data))
        event.publish("InventoryReserved", {**data, "reservation": reservation})

    @bus.on("ReleaseInventory")
    def release(event: EventContext, data: dict[str, Any]) -> None:
        desk.undo(_call(event, "reserve_inventory", undo=True), _order(data), "ReserveItems")
        event.publish("InventoryReleased", data)


def _payment(bus: EventBus, desk: Desk) -> None:
    tries: Counter[str] = Counter()  # handlings of an event in this process: glitch on the first

    @bus.on("ProcessPayment")
    def charge(event: EventContext, data: dict[str, Any]) -> None:
        tries[event.message_id] += 1
        call = _call(event, "process_payment", attempt=tries[event.message_id])
        try:
            payment = desk.charge(call, _order(data))  # ServiceUnavailable: delivered again
        except PaymentDeclined as exc:
            event.publish("PaymentFailed", {**data, "reason": str(exc)})
            return
        event.publish("PaymentProcessed", {**data, "payment": payment})

    @bus.on("RefundPayment")
    def refund(event: EventContext, data: dict[str, Any]) -> None:
        desk.undo(_call(event, "process_payment", undo=True), _order(data), "ProcessPayment")
        event.publish("PaymentRefunded", data)


def _shipping(bus: EventBus, desk: Desk) -> None:
    @bus.on("ShipOrder")
    def ship(event: EventContext, data: dict[str, Any]) -> None:
        try:
            shipment = desk.ship(_call(event, "create_shipment"), _order(data))
        except ShipmentFailed as exc:
            event.publish("ShipmentFailed", {**data, "reason": str(exc)})
            return
        event.publish("OrderShipped", {**data, "shipment": shipment})


def _notification(bus: EventBus, desk: Desk) -> None:
    @bus.on("SendConfirmation")
    def confirm(event: EventContext, data: dict[str, Any]) -> None:
        confirmation = desk.confirm(_call(event, "send_confirmation"), _order(data))
        event.publish("ConfirmationSent", {**data, "confirmation": confirmation})


_BUILDERS = {
    "OrderService": _orders,
    "InventoryService": _inventory,
    "PaymentService": _payment,
    "ShippingService": _shipping,
    "NotificationService": _notification,
}


def create_buses(
    broker: Broker | str,
    *,
    ledger_path: str | os.PathLike[str],
    inbox_dir: str | os.PathLike[str] | None = None,
    inboxes: Mapping[str, str] | None = None,
    simulation: Simulation = DEMO_SIMULATION,
    names: Iterable[str] = SERVICES,
    retry_delay: float = 0.2,
) -> list[EventBus]:
    """The services ``names`` (all five by default) as event buses, not started.

    Args:
        broker: a Broker the buses share (its owner connects and closes it) or a URL (each
            bus opens its own connection).
        ledger_path: the ledger file every service records its effects in.
        inbox_dir: where each service keeps its inbox ``<name>-inbox.db`` (default: the
            current directory), unless ``inboxes`` gives its database URL.
        simulation: declines, shipment failures, glitches and latency.
        retry_delay: seconds before an event whose handler raised is delivered again.
    """
    ledger = Ledger(ledger_path)
    where = Path(inbox_dir or ".")
    made = []
    for name in names:
        if name not in _BUILDERS:
            raise DemoError(f"unknown service {name!r}; the services are {', '.join(SERVICES)}")
        inbox = (inboxes or {}).get(name) or f"sqlite:///{where / f'{name}-inbox.db'}"
        bus = EventBus(broker, service=name, inbox=inbox, retry_delay=retry_delay)
        _BUILDERS[name](bus, Desk(name, ledger, simulation))
        made.append(bus)
    return made


def event_queues(services: Iterable[str] = SERVICES) -> list[tuple[str, str]]:
    """(topic, group) of the services' durable subscriptions."""
    return [(event, name) for name in services for event in HANDLES[name]]


# -- running it --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ChoreographyConfig:
    """One run of the example.

    Attributes:
        broker: the broker URL; a namespace of its own is added unless it names a prefix.
        db: sagakit's database, where the tracker records the flows (default
            ``sqlite:///<workdir>/orders.db``).
        orders: orders to place.
        workdir: database, ledger, inboxes and logs (default: a new temporary directory).
        simulation: declines, shipment failures, gateway glitches, latency.
        deadline: seconds without progress after which a flow is flagged.
        without: services not to start (their flows stall).
        timeout: seconds to wait for every flow to settle.
    """

    broker: str
    db: str | None = None
    orders: int = 20
    workdir: Path | None = None
    simulation: Simulation = DEMO_SIMULATION
    deadline: float = 10.0
    without: tuple[str, ...] = ()
    timeout: float = 120.0

    @property
    def services(self) -> list[str]:
        return [s for s in SERVICES if s not in self.without]


class _InProcess:
    """The services as event buses of this process (memory:// brokers)."""

    def __init__(self, url: str, config: ChoreographyConfig, workdir: Path) -> None:
        self.buses = create_buses(url, ledger_path=workdir / "ledger.db", inbox_dir=workdir,
                                  simulation=config.simulation, names=config.services)  # fmt: skip

    async def start(self) -> None:
        for bus in self.buses:
            await bus.start()

    def check(self) -> None:
        pass

    async def stop(self) -> None:
        for bus in self.buses:
            await bus.close()


def _fleet(url: str, config: ChoreographyConfig, workdir: Path, observer: Observer) -> Fleet:
    if url.startswith("memory:"):
        return _InProcess(url, config, workdir)
    children = [
        Child(name, module_argv(MODULE, "service", name, "--broker", url, "--workdir",
                                str(workdir), *sim_args(config.simulation)),
              workdir / f"{name}.log")
        for name in config.services
    ]  # fmt: skip
    return Processes(children, observer)


def flow_reason(info: SagaInfo, journal: list[Entry]) -> str:
    """Why a tracked flow failed (the event that failed it) or is parked (where it stalled)."""
    if info.state is SagaState.NEEDS_ATTENTION:
        parked = [e for e in journal if e.kind is Kind.SAGA_PARKED]
        after = (parked[-1].data or {}).get("after") if parked else None
        return f"stalled after {after}"
    return f"after {(info.error or {}).get('type')}"


async def run(config: ChoreographyConfig, observer: Observer | None = None) -> Summary:
    """Run the example end to end (see the module docstring) and return its summary."""
    observer = observer or QuietObserver()
    files = ["orders.db", "ledger.db", *(f"{s}-inbox.db" for s in SERVICES)]
    workdir = prepare_workdir(config.workdir, files)
    url, own_namespace = with_prefix(config.broker)
    queues = event_queues(config.services)
    # Every group exists before the first event, so none waits for a process still starting.
    await declare_queues(url, queues)
    db = config.db or f"sqlite:///{workdir / 'orders.db'}"
    started = time.monotonic()
    fleet = _fleet(url, config, workdir, observer)
    tracker = create_tracker(db, url, deadline=config.deadline)
    try:
        async with App(db, worker=False) as reader:
            storefront = EventBus(url, service="Storefront")  # publishes only: no inbox
            try:
                await fleet.start()
                await tracker.start()
                await storefront.start()
                ids = []
                for order in map(sample_order, range(1, config.orders + 1)):
                    sent = await storefront.publish("OrderCreated", {"order": order})
                    ids.append(tracker.saga_id(sent.correlation_id or ""))
                observer.event(f"placed {config.orders} orders")
                await settle(reader, ids, timeout=config.timeout, fleet=fleet, observer=observer)
            finally:
                await storefront.close()
                await fleet.stop()
                await tracker.close()
            found = await audit(reader, ids, Ledger(workdir / "ledger.db"), flow_reason)
    finally:
        if own_namespace:
            tracked = [(topic, tracker.group) for topic in tracker.flow.topics]
            await forget_namespace(url, [*queues, *tracked])
    retried = sum(c.attempt > 1 for c in Ledger(workdir / "ledger.db").calls())
    where = "in this process" if url.startswith("memory:") else "as processes"
    return Summary(
        title=f"{config.orders} orders over {redact(config.broker)}: {len(config.services)} "
        f"services {where} + tracker, {time.monotonic() - started:.1f} s",
        orders=config.orders,
        states=found.states,
        reasons=found.reasons,
        ledger=found.ledger,
        mismatches=found.mismatches,
        rows=[
            ("events recorded", str(found.count(Kind.EVENT_RECORDED)), "by the tracker"),
            ("payment retries", str(retried), "gateway glitches, delivered again"),
        ],
        hint=f"files in {workdir}; try: sagakit list --type {SAGA_TYPE} --db {shlex.quote(db)}",
    )


# -- the command line --------------------------------------------------------------------------


async def serve(name: str, broker: str, workdir: Path, sim: Simulation) -> None:
    """Run one service until SIGTERM."""
    (bus,) = create_buses(broker, ledger_path=workdir / "ledger.db", inbox_dir=workdir,
                          simulation=sim, names=[name])  # fmt: skip
    async with bus:
        log.info("%s ready", name)
        await wait_for_sigterm()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sagakit.examples.choreographed_order --broker URL [--orders N] ...``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["service"]:
        parser = argparse.ArgumentParser(prog=f"python -m {MODULE} service")
        parser.add_argument("name", choices=SERVICES)
        parser.add_argument("--broker", required=True)
        parser.add_argument("--workdir", type=Path, required=True)
        add_simulation_options(parser)
        args = parser.parse_args(args_list[1:])
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        asyncio.run(serve(args.name, args.broker, args.workdir, simulation_of(args)))
        return 0
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="Order fulfilment as a choreography of five service processes, followed "
        "by a tracker: places N orders, prints a summary, stops everything.",
    )
    parser.add_argument("--broker", required=True, help="amqp://..., nats://..., redis://...")
    parser.add_argument("--db", help="where the tracker records flows (default: SQLite)")
    parser.add_argument("--orders", type=int, default=20)
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--deadline", type=float, default=10.0,
                        help="seconds without progress before a flow is flagged")  # fmt: skip
    parser.add_argument("--without", action="append", default=[], choices=SERVICES,
                        help="a service not to start (its flows stall)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=120.0)
    add_simulation_options(parser)
    args = parser.parse_args(args_list)
    config = ChoreographyConfig(
        broker=args.broker, db=args.db, orders=args.orders, workdir=args.workdir,
        simulation=simulation_of(args), deadline=args.deadline, without=tuple(args.without),
        timeout=args.timeout,
    )  # fmt: skip
    return run_and_report(lambda observer: run(config, observer))


if __name__ == "__main__":
    sys.exit(main())
