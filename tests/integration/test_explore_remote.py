"""sagakit.testing.explore over sagas with remote steps: the services given to explore answer the
commands in-process (no broker), and explore fails their replies, loses their commands and
replies, and delivers commands twice. Planted bugs in the handlers must be reported."""

from __future__ import annotations

import contextlib
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sagakit import App, ConfigurationError, Entry, Kind, Saga, SagaState, WorkflowContext, step
from sagakit.remote import remote
from sagakit.service import HandlerContext, Service
from sagakit.testing import PointKind, PointRun, Status, explore
from sagakit.testing.checks import check_compensations

BROKER = "memory://explore-remote"  # never connected: explore plays the broker
STEPS = ("reserve", "charge", "ship")
ORDER = {"order": 7, "amount": 100}


def owed(run: PointRun) -> set[str]:
    exhausted = [e for e in run.journal if e.kind is Kind.COMPENSATION_EXHAUSTED]
    return set((exhausted[-1].data or {}).get("owed", ())) if exhausted else set()


@dataclass
class Shop:
    """The services' state, per saga: how often each step's effect is held (0 or 1 when all
    is well), and the answer given per idempotency key."""

    held: dict[str, Counter[str]] = field(default_factory=dict)
    answers: dict[str, Any] = field(default_factory=dict)

    def act(self, ctx: HandlerContext, what: str, answer: Any) -> Any:
        key = ctx.idempotency_key or ""
        if key not in self.answers:
            self.held.setdefault(ctx.saga_id or "", Counter())[what] += 1
            self.answers[key] = answer
        return self.answers[key]

    def undo(self, ctx: HandlerContext, what: str) -> None:
        """Undo the step's effect, if it happened: the result is None when the step timed out,
        and its effect is found by the step's own idempotency key instead."""
        key = ctx.idempotency_key or ""
        if key in self.answers:
            return
        self.answers[key] = None
        if key.removesuffix("/compensate") in self.answers:
            self.held.setdefault(ctx.saga_id or "", Counter())[what] -= 1

    def holds(self, run: PointRun) -> None:
        mine = self.held.get(run.saga_id, Counter())
        twice = {k: n for k, n in mine.items() if n not in (0, 1)}
        assert not twice, f"applied more than once: {twice}"
        left = {k for k, n in mine.items() if n}
        if run.state is SagaState.COMPLETED:
            assert left == set(STEPS), left
        elif run.state is SagaState.FAILED:
            assert not left, f"left {left}"
        else:
            assert left == owed(run), (left, owed(run))


def services(shop: Shop, *, bug: str | None = None) -> list[Service]:
    inventory = Service("Inventory", broker=BROKER)
    payments = Service("Payments", broker=BROKER)
    shipping = Service("Shipping", broker=BROKER)

    @inventory.handles("Reserve")
    async def reserve(ctx: HandlerContext, data: Any) -> Any:
        return shop.act(ctx, "reserve", {"reservation": f"R-{data['order']}"})

    @inventory.handles("Release")
    async def release(ctx: HandlerContext, data: Any) -> None:
        shop.undo(ctx, "reserve")

    @payments.handles("Charge")
    def charge(ctx: HandlerContext, data: Any) -> Any:  # sync: runs in explore's threads
        if bug == "charge_twice":  # the planted bug: every delivery charges
            mine = shop.held.setdefault(ctx.saga_id or "", Counter())
            mine["charge"] += 1
            answer = shop.answers[ctx.idempotency_key or ""] = {"payment": f"P-{mine['charge']}"}
            return answer
        return shop.act(ctx, "charge", {"payment": "P-1"})

    @payments.handles("Refund")
    def refund(ctx: HandlerContext, data: Any) -> None:
        if bug != "refund_forgets":  # the planted bug: says it refunded, but did not
            shop.undo(ctx, "charge")

    @shipping.handles("Ship")
    async def ship(ctx: HandlerContext, data: Any) -> Any:
        return shop.act(ctx, "ship", {"tracking": "T-1"})

    @shipping.handles("CancelShipment")
    async def cancel_shipment(ctx: HandlerContext, data: Any) -> None:
        shop.undo(ctx, "ship")

    return [inventory, payments, shipping]


DECLARED = Saga(
    "RemoteShop",
    steps=[
        step("reserve", remote("Inventory.Reserve"), compensate=remote("Inventory.Release"),
             timeout=30),
        step("charge", remote("Payments.Charge"), compensate=remote("Payments.Refund"),
             timeout=30),
        step("ship", remote("Shipping.Ship"), compensate=remote("Shipping.CancelShipment"),
             timeout=30),
    ],
)  # fmt: skip


async def shop_workflow(ctx: WorkflowContext, data: Any) -> Any:
    reservation = await ctx.call("Inventory.Reserve", data, name="reserve", timeout=30,
                                 compensate="Inventory.Release")  # fmt: skip
    payment = await ctx.call("Payments.Charge", data, name="charge", timeout=30,
                             compensate="Payments.Refund")  # fmt: skip
    shipment = await ctx.call("Shipping.Ship", data, name="ship", timeout=30,
                              compensate="Shipping.CancelShipment")  # fmt: skip
    return [reservation, payment, shipment]


def shop_app(tmp_path: Path, saga: Saga) -> App:
    app = App(f"sqlite:///{tmp_path / 'sagas.db'}", worker=False, broker=BROKER)
    app.register(saga)
    return app


@pytest.mark.parametrize(
    "saga", [DECLARED, Saga("RemoteShop", workflow=shop_workflow)], ids=["declared", "workflow"]
)
async def test_a_remote_saga_passes_every_point(tmp_path: Path, saga: Saga) -> None:
    shop = Shop()

    report = await explore(
        shop_app(tmp_path, saga),
        "RemoteShop",
        ORDER,
        invariant=shop.holds,
        services=services(shop),
    )

    report.raise_for_failures()
    assert not [r for r in report.results if r.status is Status.SKIPPED], report.table()
    ids = set(report.ids)
    for s in STEPS:
        assert {f"error@{s}", f"timeout@{s}", f"noreply@{s}", f"dup@{s}"} <= ids
    assert {"error@undo:reserve", "error@undo:charge", "dup@undo:reserve", "dup@undo:charge"} <= ids
    assert "error@undo:ship" not in ids  # nothing after it can fail
    assert any(i.startswith("crash@") for i in ids)
    assert any(i.startswith("error@ship+crash@") for i in ids)
    expected = {
        "clean": SagaState.COMPLETED,
        "error@charge": SagaState.FAILED,
        "timeout@charge": SagaState.FAILED,
        "noreply@ship": SagaState.FAILED,
        "dup@charge": SagaState.COMPLETED,
        "dup@undo:reserve": SagaState.FAILED,
        "error@undo:reserve": SagaState.NEEDS_ATTENTION,
    }
    assert {i: report[i].state for i in expected} == expected
    # A timed-out step may have acted: it is compensated first, with result None.
    timed_out = report["noreply@ship"].run
    assert timed_out is not None
    assert timed_out.compensated_steps == ["ship", "charge", "reserve"]
    failed = [e for e in timed_out.journal if e.kind is Kind.STEP_FAILED]
    assert [(e.step, (e.data or {}).get("uncertain")) for e in failed] == [("ship", True)]
    # The handlers' calls are the run's calls, the second delivery marked.
    dup = report["dup@charge"].run
    assert dup is not None
    assert [(c.step, c.duplicate) for c in dup.calls if c.remote and not c.compensation] == [
        ("reserve", False),
        ("charge", False),
        ("charge", True),
        ("ship", False),
    ]
    assert sum(r.seconds for r in report.results) < 30, "timeouts pass on the explore clock"


async def test_a_handler_that_is_not_idempotent_is_reported_at_its_dup_point(
    tmp_path: Path,
) -> None:
    shop = Shop()

    report = await explore(
        shop_app(tmp_path, DECLARED),
        "RemoteShop",
        ORDER,
        invariant=shop.holds,
        services=services(shop, bug="charge_twice"),
        print_table=False,
    )

    assert report.ids[0] == "clean"
    failure = report["dup@charge"]
    assert failure.status is Status.FAILED
    assert failure.state is SagaState.COMPLETED  # the saga cannot tell: the checks can
    assert any("invariant: AssertionError: applied more than once" in p for p in failure.problems)
    assert any(
        "Payments.Charge ('charge') answered its second delivery ok" in p
        and "must be idempotent by ctx.idempotency_key" in p
        for p in failure.problems
    ), failure.problems
    # Every other point delivers each command once: the bug does not show there.
    assert {r.id for r in report.failures} == {"dup@charge"}, report.table()


async def test_a_compensation_handler_that_does_not_undo_is_reported(tmp_path: Path) -> None:
    shop = Shop()

    report = await explore(
        shop_app(tmp_path, DECLARED),
        "RemoteShop",
        ORDER,
        invariant=shop.holds,
        services=services(shop, bug="refund_forgets"),
        print_table=False,
    )

    assert not report.ok
    for point in ("error@ship", "timeout@ship", "noreply@ship", "dup@undo:charge"):
        result = report[point]
        assert result.status is Status.FAILED, point
        assert result.state is SagaState.FAILED  # the engine did its part; the service did not
        assert result.problems == ("invariant: AssertionError: left {'charge'}",), point
    assert report["error@charge"].ok  # the charge never happened: nothing to refund
    assert "re-run one point alone" in report.table()


async def test_a_timed_out_step_is_compensated_even_if_it_never_acted(tmp_path: Path) -> None:
    shop = Shop()

    report = await explore(
        shop_app(tmp_path, DECLARED),
        "RemoteShop",
        ORDER,
        invariant=shop.holds,
        services=services(shop),
        only=["timeout@charge", "noreply@charge"],
        print_table=False,
    )

    report.raise_for_failures()
    lost, unanswered = report["timeout@charge"].run, report["noreply@charge"].run
    assert lost is not None
    assert unanswered is not None
    assert report["timeout@charge"].point.kind is PointKind.TIMEOUT
    # The lost command never reached the handler; the lost reply's did. Both are compensated.
    assert [(c.step, c.injected) for c in lost.calls if c.step == "charge"] == [
        ("charge", True),
        ("charge", False),
    ]
    assert [c.compensation for c in unanswered.calls if c.step == "charge"] == [False, True]
    assert lost.compensated_steps == unanswered.compensated_steps == ["charge", "reserve"]


async def test_handlers_write_through_their_services_inbox(tmp_path: Path) -> None:
    """A service made with inbox=URL runs its handlers in that database's transactions, as
    it would under Service.run: ctx.db is the connection, a raised error rolls back."""
    inbox = tmp_path / "inventory.db"
    with contextlib.closing(sqlite3.connect(inbox)) as db:
        db.execute("CREATE TABLE stock (key TEXT PRIMARY KEY, saga_id TEXT, held INTEGER)")
    inventory = Service("Inventory", broker=BROKER, inbox=f"sqlite:///{inbox}")

    @inventory.handles("Reserve")
    def reserve(ctx: HandlerContext, data: Any) -> str:
        ctx.db.execute(
            "INSERT INTO stock VALUES (?, ?, 1) ON CONFLICT (key) DO NOTHING",
            (ctx.idempotency_key, ctx.saga_id),
        )
        if data.get("fail"):
            raise RuntimeError("out of stock")  # its insert is rolled back
        return "R-1"

    @inventory.handles("Release")
    def release(ctx: HandlerContext, data: Any) -> None:
        key = (ctx.idempotency_key or "").removesuffix("/compensate")
        ctx.db.execute("UPDATE stock SET held = 0 WHERE key = ?", (key,))

    def held(run: PointRun) -> None:
        with contextlib.closing(sqlite3.connect(inbox)) as db:
            rows = db.execute("SELECT held FROM stock WHERE saga_id = ?", (run.saga_id,)).fetchall()
        left = sum(h for (h,) in rows)
        assert left == (run.state is not SagaState.FAILED), (run.state, rows)  # or owed

    async def check(ctx: WorkflowContext, data: Any) -> None:
        if data.get("refuse"):
            raise RuntimeError("refused")

    saga = Saga(
        "Stock",
        steps=[
            step("reserve", remote("Inventory.Reserve"), compensate=remote("Inventory.Release"),
                 timeout=30),
            step("check", check),
        ],
    )  # fmt: skip
    app = shop_app(tmp_path, saga)

    report = await explore(app, "Stock", {}, invariant=held, services=[inventory])
    failing = await explore(app, "Stock", {"fail": True}, invariant=held, services=[inventory],
                            print_table=False)  # fmt: skip

    report.raise_for_failures()
    failing.raise_for_failures()
    assert report["error@check"].state is SagaState.FAILED
    assert failing["clean"].state is SagaState.FAILED
    with contextlib.closing(sqlite3.connect(inbox)) as db:
        handled = db.execute("SELECT count(*) FROM sagakit_inbox").fetchone()[0]
    assert handled > len(report.results), "every command's inbox row commits with its handler"


async def test_without_an_inbox_a_handler_gets_no_database(tmp_path: Path) -> None:
    inventory = Service("Inventory", broker=BROKER)  # the default inbox: explore leaves it be

    @inventory.handles("Reserve")
    def reserve(ctx: HandlerContext, data: Any) -> None:
        ctx.db.execute("SELECT 1")

    saga = Saga("Stock", steps=[step("reserve", remote("Inventory.Reserve"))])

    report = await explore(
        shop_app(tmp_path, saga), "Stock", {}, services=[inventory], print_table=False
    )

    (problem,) = report["clean"].problems
    assert "explore gives handlers a database only for a service made with inbox=URL" in problem
    assert not default_inbox_exists("Inventory")


def default_inbox_exists(service: str) -> bool:
    return Path(f"{service}-inbox.db").exists()  # in the working directory


@pytest.mark.parametrize(
    ("given", "saying"),
    [
        (lambda shop: [], "sends Inventory.Reserve, which no service given to explore handles"),
        (lambda shop: services(shop)[:2], "Service('Shipping') with @handles('Ship')"),
        (lambda shop: [*services(shop), services(shop)[0]], "two services given to explore handle"),
    ],
    ids=["none", "one-missing", "twice"],
)
async def test_commands_without_exactly_one_handler_are_refused_up_front(
    tmp_path: Path, given: Callable[[Shop], list[Service]], saying: str
) -> None:
    with pytest.raises(ConfigurationError, match=saying.replace("(", r"\(").replace(")", r"\)")):
        await explore(shop_app(tmp_path, DECLARED), "RemoteShop", ORDER, services=given(Shop()))


async def test_a_workflow_command_without_a_handler_fails_the_point(tmp_path: Path) -> None:
    shop = Shop()

    report = await explore(
        shop_app(tmp_path, Saga("RemoteShop", workflow=shop_workflow)),
        "RemoteShop",
        ORDER,
        services=services(shop)[:1],
        print_table=False,
    )

    (problem,) = report["clean"].problems
    assert "the run raised ConfigurationError" in problem
    assert "sends Payments.Charge, which no service given to explore handles" in problem


def test_a_timed_out_remote_step_counts_as_owed_its_compensation() -> None:
    def entry(i: int, kind: Kind, name: str, seq: int, **data: Any) -> Entry:
        return Entry(saga_id="s", index=i, kind=kind, at=float(i), step=name, seq=seq,
                     data=data or None)  # fmt: skip

    steps = [
        entry(0, Kind.STEP_COMPLETED, "a", 0),
        entry(1, Kind.STEP_FAILED, "b", 1, uncertain=True),
    ]
    undo_b = [
        entry(2, Kind.COMPENSATION_STARTED, "b", 1),
        entry(3, Kind.COMPENSATION_COMPLETED, "b", 1),
    ]
    undo_a = [
        entry(4, Kind.COMPENSATION_STARTED, "a", 0),
        entry(5, Kind.COMPENSATION_COMPLETED, "a", 0),
    ]
    both = {"a", "b"}.__contains__

    assert check_compensations([*steps, *undo_b, *undo_a], SagaState.FAILED, both) == []
    assert check_compensations([*steps, *undo_a], SagaState.FAILED, both) == [
        "compensations ran in the order ['a']; reverse completion is ['b', 'a']",
        "step 'b' timed out (it may have acted) but was never compensated",
    ]
    certain = [steps[0], entry(1, Kind.STEP_FAILED, "b", 1)]  # failed for sure: nothing to undo
    assert check_compensations([*certain, *undo_a], SagaState.FAILED, both) == []
