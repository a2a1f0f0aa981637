"""The four services of the remote order example: InventoryService, PaymentService,
ShippingService and NotificationService, each handling its action and the compensation.

Each service handles a command once per message id (its inbox) and applies an effect once per
idempotency key (the :class:`~sagakit.ledger.Ledger`, through a :class:`Desk`). A compensation
first closes the idempotency key of the action it undoes, so that a copy of the action that
arrives late (after a reply timeout) does nothing. The choreographed example's services do
their business through the same :class:`Desk`.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from sagakit import StepContext
from sagakit.codec import convert
from sagakit.errors import DemoError
from sagakit.examples.order_fulfillment import (
    Order,
    PaymentDeclined,
    ServiceUnavailable,
    ShipmentFailed,
    Simulation,
)
from sagakit.examples.runner import DEMO_SIMULATION
from sagakit.ledger import Ledger, Outcome
from sagakit.messaging import Broker
from sagakit.service import HandlerContext, Service

SERVICES = ("InventoryService", "PaymentService", "ShippingService", "NotificationService")


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
