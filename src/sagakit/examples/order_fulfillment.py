"""Order fulfilment: the canonical saga, over simulated services that keep a ledger.

Four steps, each with the compensation that undoes it::

    reserve_inventory  -> release_reservation       InventoryService
    process_payment    -> refund                    PaymentService (retried, 10 s timeout)
    create_shipment    -> cancel_shipment           ShippingService
    send_confirmation  -> send_cancellation_notice  NotificationService

The services run in-process but keep their own SQLite file (:class:`sagakit.ledger.Ledger`),
deduplicated by the idempotency key sagakit hands every step: a step body re-run after a crash
gets the stored result back instead of charging the card twice. The ledger works whatever
database sagakit uses, and the worker processes of one machine may share it. Payments are
declined and shipments fail at configurable rates (business failures: no retry, the saga
compensates); the payment gateway sometimes times out on a first attempt (retried). Each
order's fate is drawn from ``random.Random(order_id)``, so a step re-run after a crash takes
the same decision.

Run it::

    python examples/order_fulfillment.py                         # 20 orders, in process
    sagakit demo                                                 # 200 orders, a worker killed
    sagakit worker --app sagakit.examples.order_fulfillment:app  # settings from SAGAKIT_DEMO_*

Several workers on PostgreSQL: give each the same ``SAGAKIT_DEMO_DB=postgresql://...`` and
``SAGAKIT_DEMO_LEDGER=/path/ledger.db``.
"""

from __future__ import annotations

import functools
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from sagakit import App, ConfigurationError, RetryPolicy, Saga, StepContext, step
from sagakit.ledger import Ledger, Outcome
from sagakit.store import SqliteStore

SAGA_TYPE = "OrderFulfillment"
STEPS = ("reserve_inventory", "process_payment", "create_shipment", "send_confirmation")


# -- the data ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Item:
    sku: str
    quantity: int
    unit_price: Decimal


@dataclass(frozen=True, slots=True, kw_only=True)
class Order:
    """The saga's input."""

    order_id: str
    customer_id: str
    items: list[Item]
    payment_method: str
    shipping_address: str

    @property
    def total(self) -> Decimal:
        """The amount to charge."""
        return sum((i.unit_price * i.quantity for i in self.items), Decimal("0"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Reservation:
    reservation_id: str
    units: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Payment:
    payment_id: str
    amount: Decimal


@dataclass(frozen=True, slots=True, kw_only=True)
class Shipment:
    shipment_id: str
    carrier: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Confirmation:
    message_id: str


class PaymentDeclined(Exception):
    """The card was declined: a business outcome, never retried."""


class ShipmentFailed(Exception):
    """No carrier accepts the parcel: a business outcome, never retried."""


class ServiceUnavailable(Exception):
    """A transient failure (the gateway timed out before doing anything): retried."""


_CATALOG = (("BOOK-1", "12.50"), ("MUG-2", "8.00"), ("LAMP-3", "34.90"), ("PEN-4", "1.99"))


def sample_order(n: int) -> Order:
    """The ``n``-th sample order, the same on every call."""
    rng = random.Random(n)
    picks = rng.sample(_CATALOG, rng.randint(1, 3))
    return Order(
        order_id=f"order-{n:04d}",
        customer_id=f"customer-{rng.randint(1, 60):02d}",
        items=[Item(sku=s, quantity=rng.randint(1, 3), unit_price=Decimal(p)) for s, p in picks],
        payment_method=rng.choice(("visa-4242", "mastercard-4444", "amex-0005")),
        shipping_address=f"{rng.randint(1, 99)} Example Street, Springfield",
    )


# -- the simulated services --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Simulation:
    """How the simulated services behave. Rates are probabilities per order."""

    decline_rate: float = 0.1
    shipment_failure_rate: float = 0.05
    glitch_rate: float = 0.05
    latency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("decline_rate", "shipment_failure_rate", "glitch_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigurationError(f"{name} must be between 0 and 1")
        if self.latency < 0:
            raise ConfigurationError("latency must be >= 0 seconds")

    def fate(self, order_id: str) -> tuple[bool, bool, bool]:
        """(declined, shipment fails, gateway glitch on the first attempt) for an order,
        drawn from ``random.Random(order_id)`` so that every run decides alike."""
        rng = random.Random(order_id)
        draws = rng.random(), rng.random(), rng.random()
        return (
            draws[0] < self.decline_rate,
            draws[1] < self.shipment_failure_rate,
            draws[2] < self.glitch_rate,
        )


class Service:
    """A simulated remote service: a call is recorded, takes a little time, and applies its
    effect once per idempotency key."""

    name = "Service"

    def __init__(self, ledger: Ledger, sim: Simulation) -> None:
        self.ledger = ledger
        self.sim = sim

    def _pause(self) -> None:
        if self.sim.latency:
            time.sleep(random.uniform(0, self.sim.latency / 2))

    def call(
        self,
        ctx: StepContext,
        order: Order,
        operation: str,
        decide: Callable[[], Outcome],
        *,
        compensation: bool = False,
        failure: type[Exception] = RuntimeError,
        unavailable: bool = False,
    ) -> dict[str, Any]:
        """Perform ``operation`` for ``order`` through the ledger; raise ``failure`` for a
        business failure and :class:`ServiceUnavailable` when ``unavailable``."""
        op, order_id = f"{self.name}.{operation}", order.order_id
        self.ledger.record_call(ctx, order_id=order_id, operation=op, compensation=compensation)
        self._pause()
        if unavailable:
            raise ServiceUnavailable(f"{op} timed out (attempt {ctx.attempt}); nothing was done")
        outcome = self.ledger.apply_once(
            ctx, order_id=order_id, operation=op, compensation=compensation, decide=decide
        )
        self._pause()
        if not outcome.ok:
            raise failure(outcome.error)
        return outcome.result or {}


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class InventoryService(Service):
    name = "InventoryService"

    def reserve(self, ctx: StepContext, order: Order) -> Reservation:
        """InventoryService.ReserveItems: hold the order's items."""
        units = sum(i.quantity for i in order.items)
        r = self.call(
            ctx,
            order,
            "ReserveItems",
            lambda: Outcome(ok=True, result={"id": _new_id("RSV"), "units": units}),
        )
        return Reservation(reservation_id=r["id"], units=r["units"])

    def release_reservation(self, ctx: StepContext, order: Order, res: Reservation) -> None:
        """InventoryService.ReleaseReservation: compensates ``reserve``."""
        self.call(
            ctx, order, "ReleaseReservation", lambda: Outcome(ok=True, result={}), compensation=True
        )


class PaymentService(Service):
    name = "PaymentService"

    def charge(self, ctx: StepContext, order: Order) -> Payment:
        """PaymentService.ProcessPayment: raises :class:`PaymentDeclined` for a declined card."""
        declined, _, glitch = self.sim.fate(order.order_id)

        def decide() -> Outcome:
            if declined:
                return Outcome(ok=False, error=f"card {order.payment_method} declined")
            return Outcome(ok=True, result={"id": _new_id("PAY"), "amount": str(order.total)})

        r = self.call(
            ctx,
            order,
            "ProcessPayment",
            decide,
            failure=PaymentDeclined,
            unavailable=glitch and ctx.attempt == 1,
        )
        return Payment(payment_id=r["id"], amount=Decimal(r["amount"]))

    def refund(self, ctx: StepContext, order: Order, payment: Payment) -> None:
        """PaymentService.RefundPayment: compensates ``charge``."""
        result = {"refund_of": payment.payment_id, "amount": str(payment.amount)}
        self.call(
            ctx, order, "RefundPayment", lambda: Outcome(ok=True, result=result), compensation=True
        )


class ShippingService(Service):
    name = "ShippingService"

    def ship(self, ctx: StepContext, order: Order) -> Shipment:
        """ShippingService.CreateShipment: raises :class:`ShipmentFailed` if no carrier will."""
        _, fails, _ = self.sim.fate(order.order_id)

        def decide() -> Outcome:
            if fails:
                return Outcome(ok=False, error=f"no carrier delivers to {order.shipping_address}")
            return Outcome(ok=True, result={"id": _new_id("SHP"), "carrier": "Parcelo"})

        r = self.call(ctx, order, "CreateShipment", decide, failure=ShipmentFailed)
        return Shipment(shipment_id=r["id"], carrier=r["carrier"])

    def cancel_shipment(self, ctx: StepContext, order: Order, shipment: Shipment) -> None:
        """ShippingService.CancelShipment: compensates ``ship``."""
        self.call(
            ctx, order, "CancelShipment", lambda: Outcome(ok=True, result={}), compensation=True
        )


class NotificationService(Service):
    name = "NotificationService"

    def confirm(self, ctx: StepContext, order: Order) -> Confirmation:
        """NotificationService.SendOrderConfirmation: tell the customer."""
        r = self.call(
            ctx,
            order,
            "SendOrderConfirmation",
            lambda: Outcome(ok=True, result={"id": _new_id("MSG")}),
        )
        return Confirmation(message_id=r["id"])

    def send_cancellation_notice(
        self, ctx: StepContext, order: Order, confirmation: Confirmation
    ) -> None:
        """NotificationService.SendCancellationNotice: compensates ``confirm``."""
        self.call(
            ctx,
            order,
            "SendCancellationNotice",
            lambda: Outcome(ok=True, result={}),
            compensation=True,
        )


# -- the saga and the app ----------------------------------------------------------------------


def order_saga(ledger: Ledger, sim: Simulation) -> Saga:
    """The OrderFulfillment saga over services that record into ``ledger``."""
    inventory, payments = InventoryService(ledger, sim), PaymentService(ledger, sim)
    shipping, notifications = ShippingService(ledger, sim), NotificationService(ledger, sim)
    payment_retry = RetryPolicy(
        max_attempts=3, initial_interval=0.05, non_retryable=(PaymentDeclined,)
    )
    return Saga(
        SAGA_TYPE,
        steps=[
            step("reserve_inventory", inventory.reserve, compensate=inventory.release_reservation),
            step(
                "process_payment",
                payments.charge,
                compensate=payments.refund,
                retry=payment_retry,
                timeout=10,
            ),
            step("create_shipment", shipping.ship, compensate=shipping.cancel_shipment),
            step(
                "send_confirmation",
                notifications.confirm,
                compensate=notifications.send_cancellation_notice,
            ),
        ],
        input_type=Order,
    )


def default_ledger_path(db_path: str | os.PathLike[str]) -> Path:
    """The ledger file next to a sagakit database: ``sagakit.db`` -> ``sagakit-ledger.db``."""
    path = Path(db_path)
    return path.with_name(f"{path.stem}-ledger.db")


def _ledger_path(app: App) -> Path:
    # A SQLite database has a file to sit next to; any other keeps it in the current directory.
    if isinstance(app.store, SqliteStore):
        return default_ledger_path(app.store.path)
    return Path("sagakit-ledger.db").resolve()


def create_app(
    url: str | None = None,
    *,
    ledger_path: str | os.PathLike[str] | None = None,
    decline_rate: float = 0.1,
    shipment_failure_rate: float = 0.05,
    glitch_rate: float = 0.05,
    latency: float = 0.0,
    concurrency: int = 32,
    worker: bool | None = None,
    lease: float = 10.0,
    poll_interval: float = 0.2,
) -> App:
    """An App with the OrderFulfillment saga registered.

    Args:
        url: sagakit's database (default ``sqlite:///sagakit.db``), SQLite or PostgreSQL.
        ledger_path: the services' ledger file (default: next to a SQLite database, else
            ``sagakit-ledger.db`` in the current directory). Workers that share a database
            must share the ledger too.
        decline_rate: share of orders whose payment is declined.
        shipment_failure_rate: share of orders no carrier accepts.
        glitch_rate: share of orders whose first payment attempt times out (retried).
        latency: seconds each service call takes at most (drawn at random).
        concurrency: sagas (and step threads) run at once.
        worker: passed to :class:`sagakit.App`; False to only start and read sagas.
        lease: PostgreSQL only: seconds a worker keeps its sagas without a heartbeat.
        poll_interval: seconds between looks for sagas to claim.
    """
    sim = Simulation(
        decline_rate=decline_rate,
        shipment_failure_rate=shipment_failure_rate,
        glitch_rate=glitch_rate,
        latency=latency,
    )
    app = App(
        url,
        worker=worker,
        max_concurrency=concurrency,
        thread_pool_size=concurrency,
        poll_interval=poll_interval,
        lease=lease,
    )
    ledger = Ledger(ledger_path or _ledger_path(app))
    app.register(order_saga(ledger, sim))
    return app


# -- configuration from the environment, for `sagakit worker --app ...:app` --------------------

ENV_VARS = {
    "url": "SAGAKIT_DEMO_DB",
    "ledger_path": "SAGAKIT_DEMO_LEDGER",
    "decline_rate": "SAGAKIT_DEMO_DECLINE_RATE",
    "shipment_failure_rate": "SAGAKIT_DEMO_SHIPMENT_FAILURE_RATE",
    "glitch_rate": "SAGAKIT_DEMO_GLITCH_RATE",
    "latency": "SAGAKIT_DEMO_LATENCY",
    "concurrency": "SAGAKIT_DEMO_CONCURRENCY",
    "lease": "SAGAKIT_DEMO_LEASE",
    "poll_interval": "SAGAKIT_DEMO_POLL_INTERVAL",
}
_PARSERS: dict[str, Callable[[str], object]] = {
    "ledger_path": str,
    "decline_rate": float,
    "shipment_failure_rate": float,
    "glitch_rate": float,
    "latency": float,
    "concurrency": int,
    "lease": float,
    "poll_interval": float,
}


def environment(**settings: object) -> dict[str, str]:
    """The ``SAGAKIT_DEMO_*`` variables that make :data:`app` use ``settings`` (the keyword
    arguments of :func:`create_app`) in another process."""
    unknown = set(settings) - set(ENV_VARS)
    if unknown:
        raise ConfigurationError(f"unknown settings {sorted(unknown)}; use {sorted(ENV_VARS)}")
    return {ENV_VARS[k]: str(v) for k, v in settings.items() if v is not None}


def app_from_environment(environ: Mapping[str, str]) -> App:
    """The App that the ``SAGAKIT_DEMO_*`` variables describe (``SAGAKIT_DEMO_DB`` falls back
    to ``SAGAKIT_DATABASE_URL``)."""
    url = environ.get(ENV_VARS["url"]) or environ.get("SAGAKIT_DATABASE_URL")
    kwargs: dict[str, Any] = {}
    for key, parse in _PARSERS.items():
        var = ENV_VARS[key]
        raw = environ.get(var)
        if raw is None:
            continue
        try:
            kwargs[key] = parse(raw)
        except ValueError:
            raise ConfigurationError(f"{var}={raw!r} is not a number") from None
    return create_app(url, **kwargs)


@functools.cache
def _env_app() -> App:
    return app_from_environment(os.environ)


def __getattr__(name: str) -> App:
    # `app` is built on first access, so importing this module reads no environment.
    if name == "app":
        return _env_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
