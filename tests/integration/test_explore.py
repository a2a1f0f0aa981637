"""sagakit.testing.explore over the shipped example, over sagas of every shape, and over sagas
with planted bugs that explore must report (real SQLite files)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import pkgutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import sagakit.examples
import sagakit.testing
from sagakit import (
    App,
    ConfigurationError,
    Entry,
    Kind,
    Middleware,
    Saga,
    SagaState,
    SignalTimedOut,
    StepCall,
    StepFailed,
    step,
)
from sagakit.definition import StepKind, flatten, parallel
from sagakit.examples import approval, remote_order
from sagakit.examples.order_fulfillment import (
    SAGA_TYPE,
    STEPS,
    Simulation,
    create_app,
    sample_order,
)
from sagakit.testing import CallRecord, ExplorationFailed, PointRun, Status, explore
from sagakit.testing.checks import check_compensations, check_reruns

# -- the shipped example -----------------------------------------------------------------------

EXPLORED_EXAMPLES = {
    "order_fulfillment",
    "approval",
    "remote_order",
}  # every module of sagakit.examples with a saga definition, explored below

# The examples that have no saga definition for explore to run, each with the reason. Not a
# way to skip one: the test below checks that such a module really defines no Saga, and that
# tests of its own exist.
NOT_EXPLORABLE_EXAMPLES = {
    # Services that react to each other's events on an EventBus, and a Tracker that only
    # records those events: no orchestrator, nothing for explore to drive or fail.
    "choreographed_order": "a choreographed flow has no saga definition",
}
# Modules of sagakit.examples that are no example but code the examples share, each with what
# it holds; checked below to define no Saga. The examples that use them test them.
EXAMPLE_HELPERS = {
    "runner": "run machinery of remote_order and choreographed_order: processes, summaries",
    "remote_services": "the services of remote_order, whose saga is explored above",
    "order_api": "an HTTP front for the order_fulfillment saga, which is explored",
}


def test_every_example_is_explored() -> None:
    examples = {m.name for m in pkgutil.iter_modules(sagakit.examples.__path__)}
    unexplored = (
        examples - EXPLORED_EXAMPLES - NOT_EXPLORABLE_EXAMPLES.keys() - EXAMPLE_HELPERS.keys()
    )
    assert not unexplored, (
        f"explore {sorted(unexplored)} in this file (or, if it has no saga definition, list it "
        "in NOT_EXPLORABLE_EXAMPLES with the reason)"
    )
    assert not EXPLORED_EXAMPLES & NOT_EXPLORABLE_EXAMPLES.keys()
    tests = [p.read_text() for p in Path(__file__).parents[1].rglob("test_*.py")]
    for name in sorted(examples & NOT_EXPLORABLE_EXAMPLES.keys()):
        module = importlib.import_module(f"sagakit.examples.{name}")
        sagas = [k for k, v in vars(module).items() if isinstance(v, Saga)]
        why = NOT_EXPLORABLE_EXAMPLES[name]
        assert not sagas, f"{name} is not explored because {why}, yet it defines {sagas}"
        covered = any(f"examples.{name}" in text or f"import {name}" in text for text in tests)
        assert covered, f"{name} is not explored ({why}); its own tests must cover it"
    for name in sorted(examples & EXAMPLE_HELPERS.keys()):
        module = importlib.import_module(f"sagakit.examples.{name}")
        sagas = [k for k, v in vars(module).items() if isinstance(v, Saga)]
        assert not sagas, (
            f"{name} is listed as a helper ({EXAMPLE_HELPERS[name]}), yet defines {sagas}"
        )


def ledger_effects(path: Path, saga_id: str) -> tuple[set[str], set[str]]:
    """(steps whose effect the services applied, steps whose compensation they applied)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT step, compensation FROM ledger_effects WHERE saga_id = ? AND ok = 1",
            (saga_id,),
        ).fetchall()
    return {s for s, c in rows if not c}, {s for s, c in rows if c}


def owed(run: PointRun) -> set[str]:
    """The compensations the journal says are still owed (empty unless a compensation failed
    for good)."""
    exhausted = [e for e in run.journal if e.kind is Kind.COMPENSATION_EXHAUSTED]
    return set((exhausted[-1].data or {}).get("owed", ())) if exhausted else set()


def books_balance(ledger: Path) -> Callable[[PointRun], None]:
    """The services' own books agree with the saga's end state."""

    def check(run: PointRun) -> None:
        did, undid = ledger_effects(ledger, run.saga_id)
        assert undid <= did, f"compensated {undid - did} without the effect"
        if run.state is SagaState.COMPLETED:
            assert did == set(STEPS), did
            assert not undid, undid
        elif run.state is SagaState.FAILED:
            assert did == undid, f"{did - undid} left uncompensated"
        else:
            assert did - undid == owed(run), (did - undid, owed(run))

    return check


@pytest.mark.parametrize(
    ("fate", "ends"),
    [
        ({}, SagaState.COMPLETED),
        ({"decline_rate": 1.0}, SagaState.FAILED),
        ({"glitch_rate": 1.0}, SagaState.COMPLETED),  # the first payment attempt times out
    ],
    ids=["accepted", "declined", "glitch"],
)
async def test_order_fulfillment_survives_every_failure_point(
    tmp_path: Path, fate: dict[str, float], ends: SagaState
) -> None:
    rates = {"decline_rate": 0.0, "shipment_failure_rate": 0.0, "glitch_rate": 0.0, **fate}
    ledger = tmp_path / "ledger.db"
    app = create_app(f"sqlite:///{tmp_path / 'sagas.db'}", ledger_path=ledger, **rates)

    report = await explore(app, SAGA_TYPE, sample_order(1), invariant=books_balance(ledger))

    report.raise_for_failures()
    assert report["clean"].state is ends
    crashes = [r for r in report.results if "crash@" in r.id]
    assert crashes, report.ids
    assert all(r.run is not None and r.run.crashes == 1 for r in crashes)
    if ends is SagaState.COMPLETED:
        assert {f"error@{s}" for s in STEPS} <= set(report.ids)
        # The last step's compensation never runs: nothing after it can fail.
        assert {f"error@undo:{s}" for s in STEPS[:-1]} <= set(report.ids)
        assert "error@undo:send_confirmation" not in report.ids
        assert "error@send_confirmation+crash@" in report.table()
    else:  # declined: the saga never gets past the payment
        assert "error@create_shipment" not in report.ids
    assert not (tmp_path / "sagas.db").exists(), "explore must not touch the App's database"


@pytest.mark.parametrize(
    ("fate", "ends"),
    [
        ({}, SagaState.COMPLETED),
        ({"decline_rate": 1.0}, SagaState.FAILED),
        ({"glitch_rate": 1.0}, SagaState.COMPLETED),  # the first payment attempt is refused
    ],
    ids=["accepted", "declined", "glitch"],
)
async def test_remote_order_fulfillment_survives_every_failure_point(
    tmp_path: Path, fate: dict[str, float], ends: SagaState
) -> None:
    rates = {"decline_rate": 0.0, "shipment_failure_rate": 0.0, "glitch_rate": 0.0, **fate}
    ledger = tmp_path / "ledger.db"
    # Explore answers the commands in-process: the broker is never connected.
    app = remote_order.create_app(f"sqlite:///{tmp_path / 'sagas.db'}", broker="memory://x")
    services = remote_order.create_services(
        "memory://x", ledger_path=ledger, inbox_dir=tmp_path, simulation=Simulation(**rates)
    )

    report = await explore(
        app,
        remote_order.SAGA_TYPE,
        sample_order(1),
        invariant=books_balance(ledger),
        services=services,
    )

    report.raise_for_failures()
    assert report["clean"].state is ends
    assert not [r.id for r in report.results if r.status is Status.SKIPPED], report.table()
    if ends is SagaState.COMPLETED:
        for s in STEPS:
            assert {f"error@{s}", f"timeout@{s}", f"noreply@{s}", f"dup@{s}"} <= set(report.ids)
        assert {f"dup@undo:{s}" for s in STEPS[:-1]} <= set(report.ids)
        # A confirmation sent whose reply was lost is compensated by a cancellation notice.
        unanswered = report["noreply@send_confirmation"].run
        assert unanswered is not None
        assert unanswered.compensated_steps == list(reversed(STEPS))
    else:  # declined: the saga never gets past the payment
        assert "error@create_shipment" not in report.ids
    assert not (tmp_path / "sagas.db").exists(), "explore must not touch the App's database"


def budget_invariant(budget_file: Path) -> Callable[[PointRun], None]:
    """The budget service agrees with the approval saga's end state: an approved purchase keeps
    its hold and has one order; anything else released its hold and ordered nothing."""

    def check(run: PointRun) -> None:
        with contextlib.closing(sqlite3.connect(budget_file)) as db:
            hold = db.execute(
                "SELECT released FROM holds WHERE key = ?", (f"{run.saga_id}/reserve_budget",)
            ).fetchone()
            orders = db.execute(
                "SELECT count(*) FROM orders WHERE key LIKE ?", (f"{run.saga_id}/%",)
            ).fetchone()[0]
        kept = hold is not None and not hold[0]
        if run.state is SagaState.COMPLETED:
            assert kept, "an approved purchase lost its budget"
            assert orders == 1, orders
        else:
            assert kept == ("reserve_budget" in owed(run)), (run.state, hold, owed(run))
            assert orders == 0, orders

    return check


@pytest.mark.parametrize(
    ("answer", "ends"),
    [
        ({"approve": approval.Decision(by="ann")}, SagaState.COMPLETED),
        ({"reject": approval.Decision(by="bob", comment="too dear")}, SagaState.FAILED),
        ({}, SagaState.FAILED),  # nobody answers in three days
    ],
    ids=["approved", "rejected", "expired"],
)
async def test_purchase_approval_survives_every_failure_point(
    tmp_path: Path, answer: dict[str, Any], ends: SagaState
) -> None:
    budget = tmp_path / "budget.db"
    app = approval.create_app(f"sqlite:///{tmp_path / 'sagas.db'}", budget_path=budget)

    report = await explore(
        app,
        approval.SAGA_TYPE,
        approval.sample_request(1),
        invariant=budget_invariant(budget),
        signals=answer,
    )

    report.raise_for_failures()
    assert report["clean"].state is ends
    if ends is SagaState.COMPLETED:
        assert report["error@place_purchase_order"].state is SagaState.FAILED  # the pivot
        assert report["error@notify_requester"].state is SagaState.COMPLETED  # retriable
        assert report["error@undo:reserve_budget"].point.trigger == "place_purchase_order"
    assert sum(r.seconds for r in report.results) < 30, "three days each, in virtual time"


# -- a toy world to plant bugs in --------------------------------------------------------------


@dataclass
class World:
    """A travel agency's services, per saga: a seat, a card balance, a hotel room."""

    seats: set[str] = field(default_factory=set)
    balance: dict[str, int] = field(default_factory=dict)
    hotels: set[str] = field(default_factory=set)
    mailed: set[str] = field(default_factory=set)
    applied: set[str] = field(default_factory=set)  # idempotency keys already applied

    def once(self, key: str, effect: Callable[[], None]) -> None:
        if key not in self.applied:
            self.applied.add(key)
            effect()

    def charge(self, saga_id: str, amount: int) -> None:
        self.balance[saga_id] = self.balance.get(saga_id, 0) - amount

    def holds(self, run: PointRun) -> None:
        """What the world must look like for a saga in its end state."""
        sid = run.saga_id
        booked = {n for n, b in (("seat", self.seats), ("hotel", self.hotels)) if sid in b}
        charged = self.balance.get(sid, 0)
        if run.state is SagaState.COMPLETED:
            assert booked == {"seat", "hotel"}, booked
            assert charged == -100, charged
        elif run.state is SagaState.FAILED:
            assert (booked, charged) == (set(), 0), f"left {booked}, balance {charged}"
        else:
            left = booked | ({"charge"} if charged else set())
            want = {n.replace("reserve_", "").replace("book_", "") for n in owed(run)}
            assert left == want, (left, want)


def trip(world: World, *, bug: str | None = None) -> Saga:
    """reserve_seat, charge, book_hotel, mail_tickets; ``bug`` plants one mistake."""

    def reserve_seat(ctx: Any, data: Any) -> str:
        world.once(ctx.idempotency_key, lambda: world.seats.add(ctx.saga_id))
        return "seat-1"

    def release_seat(ctx: Any, data: Any, seat: str) -> None:
        world.once(ctx.idempotency_key, lambda: world.seats.discard(ctx.saga_id))

    def charge(ctx: Any, data: Any) -> int:
        if bug == "charge_twice":
            world.charge(ctx.saga_id, 100)  # no idempotency key: a re-run charges again
        else:
            world.once(ctx.idempotency_key, lambda: world.charge(ctx.saga_id, 100))
        return 100

    def refund(ctx: Any, data: Any, amount: int) -> None:
        if bug == "refund_twice":
            world.charge(ctx.saga_id, -amount)  # no idempotency key: a re-run refunds again
        else:
            world.once(ctx.idempotency_key, lambda: world.charge(ctx.saga_id, -amount))

    async def book_hotel(ctx: Any, data: Any) -> str:
        world.once(ctx.idempotency_key, lambda: world.hotels.add(ctx.saga_id))
        return "room-7"

    async def cancel_hotel(ctx: Any, data: Any, room: str) -> None:
        if bug != "cancel_forgets":  # the planted bug: says it cancelled, but did not
            world.once(ctx.idempotency_key, lambda: world.hotels.discard(ctx.saga_id))

    async def mail_tickets(ctx: Any, data: Any) -> None:
        world.mailed.add(ctx.saga_id)

    return Saga(
        "Trip",
        steps=[
            step("reserve_seat", reserve_seat, compensate=release_seat),
            step("charge", charge, compensate=refund),
            step("book_hotel", book_hotel, compensate=cancel_hotel),
            step("mail_tickets", mail_tickets),
        ],
    )


@pytest.fixture
def world() -> World:
    return World()


def trip_app(tmp_path: Path, *sagas: Saga) -> App:
    app = App(f"sqlite:///{tmp_path / 'trips.db'}", worker=False)
    for s in sagas:
        app.register(s)
    return app


async def test_a_correct_saga_passes_every_point(tmp_path: Path, world: World) -> None:
    report = await explore(
        trip_app(tmp_path, trip(world)), "Trip", {"to": "Oslo"}, invariant=world.holds
    )
    report.raise_for_failures()
    assert report.ids[:5] == [
        "clean",
        "error@reserve_seat",
        "error@charge",
        "error@book_hotel",
        "error@mail_tickets",
    ]
    assert report["error@undo:book_hotel"].point.trigger == "mail_tickets"
    assert report["error@undo:book_hotel"].state is SagaState.NEEDS_ATTENTION


# -- sagas of every shape -----------------------------------------------------------------------


@dataclass
class Desk:
    """Effects per saga id, each applied once per idempotency key."""

    held: dict[str, set[str]] = field(default_factory=dict)
    applied: set[str] = field(default_factory=set)

    def apply(self, ctx: Any, what: str, *, undo: bool = False) -> None:
        if ctx.idempotency_key in self.applied:
            return
        self.applied.add(ctx.idempotency_key)
        mine = self.held.setdefault(ctx.saga_id, set())
        (mine.discard if undo else mine.add)(what)

    def holds(self, everything: set[str], undoable: set[str]) -> Callable[[PointRun], None]:
        def check(run: PointRun) -> None:
            mine = self.held.get(run.saga_id, set())
            if run.state is SagaState.COMPLETED:
                assert mine == everything, mine
            elif run.state is SagaState.FAILED:
                assert not mine & undoable, f"{mine & undoable} left uncompensated"
            else:
                assert mine & undoable == owed(run), (mine, owed(run))

        return check


def effect(desk: Desk, name: str, *, fails_first: bool = False) -> Any:
    async def action(ctx: Any, data: Any) -> str:
        desk.apply(ctx, name)
        return name

    return action


def undo(desk: Desk, name: str) -> Any:
    def compensation(ctx: Any, data: Any, result: Any) -> None:
        desk.apply(ctx, name, undo=True)

    return compensation


async def test_parallel_groups_pivot_and_retriable_steps(tmp_path: Path) -> None:
    desk = Desk()

    def held(name: str) -> Any:
        return step(name, effect(desk, name), compensate=undo(desk, name))

    saga = Saga(
        "Shapes",
        steps=[
            step("validate", effect(desk, "validate")),
            parallel(held("hold_seat"), held("hold_room"), held("hold_car")),
            step("pay", effect(desk, "pay"), pivot=True),
            step("issue", effect(desk, "issue"), retriable=True),
            step("notify", effect(desk, "notify"), retriable=True),
        ],
    )
    everything = {"validate", "hold_seat", "hold_room", "hold_car", "pay", "issue", "notify"}
    invariant = desk.holds(everything, {"hold_seat", "hold_room", "hold_car"})

    report = await explore(trip_app(tmp_path, saga), "Shapes", None, invariant=invariant)

    report.raise_for_failures()
    expected = {
        "error@validate": SagaState.FAILED,
        "error@hold_room": SagaState.FAILED,
        "error@pay": SagaState.FAILED,  # the pivot fails: the holds are compensated
        "error@issue": SagaState.COMPLETED,  # retriable: retried until it succeeds
        "error@undo:hold_car": SagaState.NEEDS_ATTENTION,
    }
    assert {i: report[i].state for i in expected} == expected
    assert report["error@undo:hold_seat"].point.trigger == "pay"
    assert "error@undo:validate" not in report.ids  # nothing to compensate
    assert any(i.startswith("error@pay+crash@") for i in report.ids)


async def test_a_workflow_with_timers_and_signals_explores_in_virtual_time(
    tmp_path: Path,
) -> None:
    desk = Desk()

    async def asks_for_approval(ctx: Any, data: Any) -> str:
        await ctx.step(
            effect(desk, "request"), data, name="request", compensate=undo(desk, "request")
        )
        try:
            decision = await ctx.wait_for_signal("decision", timeout=timedelta(days=3))
        except SignalTimedOut:
            decision = "escalated"
        await ctx.sleep(timedelta(days=1))  # a day's grace before it is recorded
        await ctx.step(
            effect(desk, "record"), decision, name="record", compensate=undo(desk, "record")
        )
        return str(decision)

    app = trip_app(tmp_path, Saga("Approval", workflow=asks_for_approval))
    invariant = desk.holds({"request", "record"}, {"request", "record"})

    approved = await explore(
        app, "Approval", {"amount": 120}, invariant=invariant, signals={"decision": "approved"}
    )
    escalated = await explore(app, "Approval", {"amount": 120}, invariant=invariant)

    approved.raise_for_failures()
    escalated.raise_for_failures()
    assert approved["clean"].run is not None
    assert approved["clean"].run.output == "approved"
    assert escalated["clean"].run is not None
    assert escalated["clean"].run.output == "escalated"
    kinds = {e.kind for e in escalated["clean"].run.journal}
    assert {Kind.SIGNAL_TIMED_OUT, Kind.TIMER_FIRED} <= kinds
    # A workflow's compensations are known from the runs in which they were called.
    assert "error@undo:request" in approved.ids
    assert sum(r.seconds for r in approved.results) < 10  # four virtual days per point


async def test_a_parent_saga_runs_its_child_sagas(tmp_path: Path) -> None:
    desk = Desk()
    hold = Saga("Hold", steps=[step("hold", effect(desk, "hold"), compensate=undo(desk, "hold"))])

    async def trip_with_child(ctx: Any, data: Any) -> str:
        await ctx.step(effect(desk, "check"), data, name="check")  # nothing to compensate
        await ctx.child("Hold", data, name="hold_child")
        return str(await ctx.step(effect(desk, "pay"), data, name="pay"))

    app = trip_app(tmp_path, hold, Saga("Parent", workflow=trip_with_child))

    def nothing_held_unless_completed(run: PointRun) -> None:
        children = {e.data["child"] for e in run.journal if e.data and "child" in e.data}
        held = {c for c in children if "hold" in desk.held.get(c, set())}
        assert bool(held) == (run.state is SagaState.COMPLETED), (run.state, held)

    report = await explore(app, "Parent", {}, invariant=nothing_held_unless_completed)

    report.raise_for_failures()
    assert report["error@pay"].state is SagaState.FAILED
    assert report["error@pay"].run is not None
    assert report["error@pay"].run.compensated_steps == ["hold_child"]
    # A workflow's step whose compensation never ran has none: no point for it.
    assert "error@undo:check" not in report.ids


async def test_a_point_whose_fault_never_strikes_is_skipped(tmp_path: Path) -> None:
    decisions = iter(["a"])

    def decide(ctx: Any, data: Any) -> str:
        return next(decisions, "b")  # the clean run goes one way, every later saga the other

    def way(ctx: Any, data: Any) -> None:
        pass

    async def fork(ctx: Any, data: Any) -> None:
        if await ctx.step(decide, data) == "a":
            await ctx.step(way, data, name="way_a")
        else:
            await ctx.step(way, data, name="way_b")

    app = trip_app(tmp_path, Saga("Fork", workflow=fork))

    report = await explore(app, "Fork", None, print_table=False)

    assert report.ok
    skipped = report["error@way_a"]
    assert (skipped.status, skipped.note) == (Status.SKIPPED, "way_a was never called")
    assert "1 skipped" in report.table().splitlines()[0]


async def test_the_apps_middleware_sees_every_call(tmp_path: Path, world: World) -> None:
    seen: list[tuple[str, bool]] = []

    class Audit(Middleware):
        async def step(self, call: StepCall, proceed: Any) -> Any:
            seen.append((call.step, call.compensation))
            return await proceed()

    app = App(f"sqlite:///{tmp_path / 'trips.db'}", worker=False, middleware=[Audit()])
    app.register(trip(world))

    report = await explore(app, "Trip", {}, only="error@mail_tickets", print_table=False)

    assert report.ok
    # Injected failures happen inside the App's middleware, as a failing service would.
    assert seen[-4:] == [
        ("mail_tickets", False),
        ("book_hotel", True),
        ("charge", True),
        ("reserve_seat", True),
    ]


async def test_a_saga_that_never_comes_to_rest_is_reported(tmp_path: Path) -> None:
    async def hangs(ctx: Any, data: Any) -> None:
        await asyncio.Event().wait()

    app = trip_app(tmp_path, Saga("Hangs", steps=[step("hangs", hangs)]))

    report = await explore(app, "Hangs", None, point_timeout=0.2, print_table=False)

    assert report.ids == ["clean"]
    assert report.failures[0].problems == ("the saga did not come to rest within 0.2 s",)


async def test_a_wait_for_a_signal_nobody_sends_is_reported(tmp_path: Path) -> None:
    async def waits(ctx: Any, data: Any) -> Any:
        return await ctx.wait_for_signal("go")

    app = trip_app(tmp_path, Saga("Waits", workflow=waits))

    report = await explore(app, "Waits", None, print_table=False)

    (problem,) = report["clean"].problems
    assert "it waits for signal 'go', which explore does not send" in problem


# -- planted bugs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bug", "caught_at", "saying"),
    [
        # The compensation does not undo its effect: caught wherever the hotel is compensated.
        ("cancel_forgets", "error@mail_tickets", "left {'hotel'}"),
        # A compensation that is not idempotent refunds twice when the process dies after the
        # refund and before its completion is durable.
        ("refund_twice", "compensation_completed charge", "balance 100"),
        # An action that is not idempotent charges twice after a crash before its completion
        # is durable: the engine may run it again, the service must deduplicate.
        ("charge_twice", "step_completed charge (queued)", "-200"),
    ],
)
async def test_a_planted_bug_is_reported_at_its_failure_point(
    tmp_path: Path, world: World, bug: str, caught_at: str, saying: str
) -> None:
    app = trip_app(tmp_path, trip(world, bug=bug))

    report = await explore(app, "Trip", {"to": "Oslo"}, invariant=world.holds, print_table=False)

    assert not report.ok
    failed = [r for r in report.failures if caught_at in r.id or caught_at in r.point.description]
    assert failed, report.table()
    assert any(saying in p for r in failed for p in r.problems), report.table()
    assert all(r.status is Status.FAILED for r in report.failures)


async def test_a_workflow_that_skips_its_compensations_is_reported(
    tmp_path: Path, world: World
) -> None:
    declared = trip(world)
    actions = {s.name: s for s in flatten(declared.steps)}

    async def swallowing(ctx: Any, data: Any) -> str:
        for name in ("reserve_seat", "charge", "book_hotel"):
            s = actions[name]
            try:
                await ctx.step(s.action, data, name=name, compensate=s.compensate)
            except StepFailed:
                return "never mind"  # the bug: the saga "completes" with effects left behind
        return "booked"

    app = trip_app(tmp_path, Saga("Trip", workflow=swallowing))

    report = await explore(app, "Trip", {"to": "Oslo"}, invariant=world.holds, print_table=False)

    failure = report["error@book_hotel"]
    assert failure.status is Status.FAILED
    assert "the saga ended completed, expected failed" in failure.problems
    assert any("invariant" in p for p in failure.problems)
    # A test that means it says so, and then the engine's part is checked all the same.
    report = await explore(
        app,
        "Trip",
        {"to": "Oslo"},
        only="error@book_hotel",
        expect={"error@book_hotel": "completed"},
        print_table=False,
    )
    assert report["error@book_hotel"].problems == ()  # no invariant given this time


# -- re-running one point, and the report ---------------------------------------------------------


async def test_one_point_runs_alone_by_its_id(tmp_path: Path, world: World) -> None:
    app = trip_app(tmp_path, trip(world, bug="refund_twice"))
    full = await explore(app, "Trip", {}, invariant=world.holds, print_table=False)
    failing = full.failures[0].id

    again = await explore(app, "Trip", {}, invariant=world.holds, only=failing, print_table=False)

    assert again.ids == [failing]
    assert again[failing].problems == full[failing].problems
    both = await explore(app, "Trip", {}, only=["crash@2", "clean"], print_table=False)
    assert both.ids == ["crash@2", "clean"]
    with pytest.raises(ConfigurationError, match=r"no failure point 'crash@999'.*crash@1"):
        await explore(app, "Trip", {}, only="crash@999")


async def test_the_table_is_printed_and_raised(
    tmp_path: Path, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    app = trip_app(tmp_path, trip(world, bug="cancel_forgets"))

    report = await explore(app, "Trip", {}, invariant=world.holds)

    printed = capsys.readouterr().out
    assert printed.strip() == report.table() == str(report)
    lines = printed.splitlines()
    assert lines[0].startswith("explore Trip: ")
    assert "FAILED" in lines[0]
    assert lines[1].split() == ["point", "injected", "expected", "got", "result"]
    assert any(line.split()[:1] == ["error@mail_tickets"] and "FAILED" in line for line in lines)
    assert any(line.strip().startswith("- invariant: AssertionError") for line in lines)
    assert lines[-1].startswith("re-run one point alone: explore(..., only='")
    with pytest.raises(ExplorationFailed) as raised:
        report.raise_for_failures()
    assert str(raised.value) == report.table()
    assert isinstance(raised.value, AssertionError)


# -- the checks, on hand-made journals: what no correct engine run can show ----------------------


def journal(*rows: tuple[Kind, str | None, int | None]) -> list[Entry]:
    return [
        Entry(saga_id="s", index=i, kind=kind, at=float(i), step=name, seq=seq)
        for i, (kind, name, seq) in enumerate(rows)
    ]


def test_compensations_out_of_order_or_missing_are_problems() -> None:
    done = [(Kind.STEP_COMPLETED, "a", 0), (Kind.STEP_COMPLETED, "b", 1)]
    wrong_order = journal(
        *done,
        (Kind.COMPENSATION_STARTED, "a", 0),
        (Kind.COMPENSATION_COMPLETED, "a", 0),
        (Kind.COMPENSATION_STARTED, "b", 1),
        (Kind.COMPENSATION_COMPLETED, "b", 1),
    )
    missing = journal(
        *done, (Kind.COMPENSATION_STARTED, "b", 1), (Kind.COMPENSATION_COMPLETED, "b", 1)
    )
    both = {"a", "b"}.__contains__

    assert check_compensations(wrong_order, SagaState.FAILED, both) == [
        "compensations ran in the order ['a', 'b']; reverse completion is ['b', 'a']"
    ]
    assert check_compensations(missing, SagaState.FAILED, both) == [
        "step 'a' completed but was never compensated"
    ]
    assert check_compensations(missing, SagaState.NEEDS_ATTENTION, both) == []
    assert check_compensations(missing, SagaState.FAILED, {"b"}.__contains__) == []


def test_a_call_after_its_outcome_was_durable_is_a_problem() -> None:
    (completed,) = journal((Kind.STEP_COMPLETED, "pay", 0))

    def call(tick: int) -> CallRecord:
        return CallRecord(
            tick=tick,
            step="pay",
            compensation=False,
            attempt=1,
            kind=StepKind.COMPENSATABLE,
            injected=False,
            life=1,
        )

    assert check_reruns([call(1), call(3)], [(completed, 2)]) == [
        "step 'pay' ran again (attempt 1) after its outcome was durable"
    ]
    assert check_reruns([call(1)], [(completed, 2)]) == []


def test_the_public_api_of_sagakit_testing() -> None:
    assert sorted(sagakit.testing.__all__) == [
        "CallRecord",
        "ExplorationFailed",
        "ExploreReport",
        "FailurePoint",
        "InjectedFault",
        "Invariant",
        "PointKind",
        "PointResult",
        "PointRun",
        "SimulatedCrash",
        "Status",
        "VirtualClock",
        "explore",
        "until_waiting",
    ]
