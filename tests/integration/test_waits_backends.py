"""Durable waits on both backends with the real clock: sleeps, signals, signal timeouts,
cancellation, parallel groups, child sagas, and a sleep that outlives its App.

Each test runs on a SQLite file and on a PostgreSQL schema of its own (``any_url``), with
short real durations. On PostgreSQL a timer is judged by the database's clock, so the
sleep test reads that clock from the step that runs after the timer fired.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from sagakit import (
    App,
    InvalidSagaState,
    Kind,
    SagaInfo,
    SagaState,
    SignalTimedOut,
    WorkflowContext,
)
from sagakit.definition import Saga, step
from sagakit.examples.approval import SAGA_TYPE, budget_of, create_app, sample_request

Check = Callable[[App, str], Awaitable[Any]]

POLL = 0.05


def new_app(url: str, **kw: Any) -> App:
    return App(url, poll_interval=POLL, **kw)


class Log:
    """What step bodies and compensations did, in order (one per test: no global state)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def act(self, name: str, *, fail: bool = False, gate: asyncio.Event | None = None) -> Any:
        async def action(ctx: Any, data: Any) -> str:
            self.lines.append(f"do {name}")
            if gate is not None:
                await asyncio.wait_for(gate.wait(), 5)
            if fail:
                raise RuntimeError(f"{name} failed")
            return name

        action.__name__ = name
        return action

    def undo(self, name: str, *, overlap: asyncio.Barrier | None = None) -> Any:
        async def compensation(ctx: Any, data: Any, result: Any) -> None:
            self.lines.append(f"begin undo {name}")
            if overlap is not None:
                # Both of a group's compensations must be running at once to get past this;
                # run one after the other, each waits out the timeout and the log shows it.
                try:
                    async with asyncio.timeout(1.0):
                        await overlap.wait()
                except TimeoutError:
                    pass
            self.lines.append(f"undo {name}")

        return compensation

    def undos(self) -> list[str]:
        return [line for line in self.lines if line.startswith("undo")]


async def settle(app: App, saga_id: str, timeout: float = 5.0) -> SagaInfo:
    async with asyncio.timeout(timeout):
        return await app.wait(saga_id)


async def until_waiting(app: App, saga_id: str, timeout: float = 5.0) -> SagaInfo:
    """Until the saga is unloaded (its row has a wake-up time); return its row then."""
    async with asyncio.timeout(timeout):
        while not (info := await app.get(saga_id)).waiting:
            await asyncio.sleep(0.01)
    return info


def is_pg(url: str) -> bool:
    return url.startswith("postgres")


async def db_now(url: str) -> float:
    """Now by the clock that judges timers: the database's on PostgreSQL, else this host's."""
    if not is_pg(url):
        return time.time()
    import asyncpg

    conn = await asyncpg.connect(urlunsplit(urlsplit(url)._replace(query="")))
    try:
        return float(await conn.fetchval("SELECT extract(epoch from clock_timestamp())::float8"))
    finally:
        await conn.close()


# -- timers ------------------------------------------------------------------------------------


async def test_durable_sleep_unloads_the_saga_and_never_fires_early(
    any_url: str, check: Check
) -> None:
    log = Log()
    async with new_app(any_url) as app:

        @app.saga("Nap")
        async def nap(ctx: WorkflowContext, data: Any) -> float:
            await ctx.step(log.act("before"))
            await ctx.sleep(0.3)
            # A step body runs live once the timer fired: read the judging clock there.
            return float(await ctx.step(clock_after_sleep))

        async def clock_after_sleep(ctx: Any, data: Any) -> float:
            return await db_now(any_url)

        began = time.time()
        handle = await app.start("Nap", None)
        waiting = await until_waiting(app, handle.id)
        # Unloaded: its run ends right after the suspend that until_waiting saw committed,
        # well before the timer is due.
        async with asyncio.timeout(0.2):
            while handle.id in app._runner.tasks:  # type: ignore[union-attr]
                await asyncio.sleep(0.001)
        assert waiting.state is SagaState.RUNNING
        assert waiting.wake_at is not None
        woke_by_db_clock = await asyncio.wait_for(handle.result(), 5)
        took = time.time() - began

        c = await check(app, handle.id)
        (started,) = c.of(Kind.TIMER_STARTED)
        (fired,) = c.of(Kind.TIMER_FIRED)
        until = float((started.data or {})["until"])
        assert abs(waiting.wake_at.timestamp() - until) < 1e-3
        assert until - started.at == pytest.approx(0.3, abs=0.1)
        assert fired.at >= until, (fired.at, until)
        assert woke_by_db_clock >= until, (woke_by_db_clock, until)
        assert 0.3 <= took < 1.5, took
        assert log.lines == ["do before"]
        info = await app.get(handle.id)
        assert info.state is SagaState.COMPLETED
        assert info.waiting is False


async def test_a_sleep_outlives_its_app_and_a_new_app_resumes_it(
    any_url: str, check: Check
) -> None:
    log = Log()

    def sleepy_app() -> App:
        app = new_app(any_url)

        @app.saga("Sleepy")
        async def sleepy(ctx: WorkflowContext, data: Any) -> str:
            await ctx.step(log.act("before"))
            await ctx.sleep(0.5)
            return str(await ctx.step(log.act("after")))

        return app

    async with sleepy_app() as first:
        handle = await first.start("Sleepy", None)
        info = await until_waiting(first, handle.id)
        assert info.wake_at is not None
        due = info.wake_at.timestamp()
    closed = time.time()
    async with sleepy_app() as second:
        # The new App's recovery has run (open() does it): a saga not yet due stays unloaded.
        early = await second.get(handle.id)
        if time.time() < due:
            assert early.state is SagaState.RUNNING
            assert early.waiting, "resumed before its timer was due"
        assert await asyncio.wait_for(second.handle(handle.id).result(), 5) == "after"
        assert time.time() - closed < 1.5
        c = await check(second, handle.id)
        (started,) = c.of(Kind.TIMER_STARTED)
        (fired,) = c.of(Kind.TIMER_FIRED)
        assert fired.at >= float((started.data or {})["until"])
        assert log.lines == ["do before", "do after"]  # nothing ran twice
        assert c.steps(Kind.STEP_STARTED) == [
            (Kind.STEP_STARTED, "before", 1),
            (Kind.STEP_STARTED, "after", 1),
        ]


# -- signals -----------------------------------------------------------------------------------


async def test_a_signal_sent_before_the_wait_and_one_sent_during_it(
    any_url: str, check: Check
) -> None:
    log = Log()
    gate = asyncio.Event()
    async with new_app(any_url) as app:

        @app.saga("TwoSignals")
        async def two_signals(ctx: WorkflowContext, data: Any) -> list[Any]:
            await ctx.step(log.act("prepare", gate=gate))
            early = await ctx.wait_for_signal("early", timeout=5)
            late = await ctx.wait_for_signal("late", timeout=5)
            return [early, late]

        handle = await app.start("TwoSignals", None)
        async with asyncio.timeout(5):
            while "do prepare" not in log.lines:
                await asyncio.sleep(0.01)
        # Sent while the step before the wait still runs: stored, delivered when it waits.
        assert await handle.signal("early", {"n": 1}, signal_id="e1")
        kinds = [e.kind for e in await app.journal(handle.id)]
        assert Kind.SIGNAL_WAITING not in kinds
        gate.set()
        info = await until_waiting(app, handle.id)
        assert info.wake_at is not None  # the wait for "late" times out, so it has a time
        assert await handle.signal("late", {"n": 2}, signal_id="l1")
        assert not await handle.signal("late", {"n": 3}, signal_id="l1")  # a repeat
        assert await asyncio.wait_for(handle.result(), 5) == [{"n": 1}, {"n": 2}]

        c = await check(app, handle.id)
        received = c.of(Kind.SIGNAL_RECEIVED)
        assert [(e.data or {})["signal_id"] for e in received] == ["e1", "l1"]
        waiting = c.of(Kind.SIGNAL_WAITING)
        assert [(e.data or {})["name"] for e in waiting] == ["early", "late"]
        assert Kind.SIGNAL_TIMED_OUT not in c.kinds()
        with pytest.raises(InvalidSagaState, match="completed"):
            await handle.signal("late", {"n": 4})


async def test_a_signal_timeout_compensates(any_url: str, check: Check) -> None:
    log = Log()
    async with new_app(any_url) as app:

        @app.saga("Approval")
        async def approval(ctx: WorkflowContext, data: Any) -> Any:
            await ctx.step(log.act("reserve"), compensate=log.undo("reserve"))
            decision = await ctx.wait_for_signal("decision", timeout=0.3)
            await ctx.step(log.act("never"))
            return decision

        began = time.time()
        handle = await app.start("Approval", None)
        await until_waiting(app, handle.id)
        info = await settle(app, handle.id)
        took = time.time() - began
        assert info.state is SagaState.FAILED
        assert info.error is not None
        assert info.error["type"] == "SignalTimedOut"
        assert log.lines == ["do reserve", "begin undo reserve", "undo reserve"]
        assert 0.3 <= took < 1.5, took
        c = await check(app, handle.id)
        (waiting,) = c.of(Kind.SIGNAL_WAITING)
        (timed_out,) = c.of(Kind.SIGNAL_TIMED_OUT)
        assert timed_out.at >= float((waiting.data or {})["until"])
        assert Kind.SIGNAL_RECEIVED not in c.kinds()
        with pytest.raises(InvalidSagaState):
            await handle.signal("decision", {"approve": True})


async def test_wait_for_any_signal_takes_the_first_of_several(any_url: str) -> None:
    async with new_app(any_url) as app:

        @app.saga("Either")
        async def either(ctx: WorkflowContext, data: Any) -> list[Any]:
            name, payload = await ctx.wait_for_any_signal("approve", "reject", timeout=5)
            try:
                await ctx.wait_for_signal("approve", timeout=0.2)
            except SignalTimedOut:
                return [name, payload, "no second approve"]
            return [name, payload, "second approve"]

        handle = await app.start("Either", None)
        await until_waiting(app, handle.id)
        await handle.signal("reject", {"by": "bob"})
        assert await asyncio.wait_for(handle.result(), 5) == [
            "reject",
            {"by": "bob"},
            "no second approve",
        ]


# -- cancellation ------------------------------------------------------------------------------


async def test_cancel_while_waiting_compensates_and_ends_cancelled(
    any_url: str, check: Check
) -> None:
    log = Log()
    async with new_app(any_url) as app:

        @app.saga("Waits")
        async def waits(ctx: WorkflowContext, data: Any) -> None:
            await ctx.step(log.act("a"), compensate=log.undo("a"))
            await ctx.step(log.act("b"), compensate=log.undo("b"))
            await ctx.wait_for_signal("go")
            await ctx.step(log.act("c"), compensate=log.undo("c"))

        handle = await app.start("Waits", None)
        info = await until_waiting(app, handle.id)
        assert info.wake_at is None  # no timeout: it waits for ever
        await handle.cancel("changed my mind")
        info = await settle(app, handle.id)
        assert info.state is SagaState.CANCELLED
        assert log.lines == ["do a", "do b", "begin undo b", "undo b", "begin undo a", "undo a"]
        c = await check(app, handle.id)
        (request,) = c.of(Kind.CANCEL_REQUESTED)
        assert (request.data or {})["reason"] == "changed my mind"
        assert c.kinds()[-1] is Kind.SAGA_CANCELLED
        assert Kind.SIGNAL_RECEIVED not in c.kinds()
        with pytest.raises(InvalidSagaState):
            await app.cancel(handle.id)


async def test_cancel_during_a_step_lets_it_finish_compensates_it_and_runs_no_more(
    any_url: str, check: Check
) -> None:
    log = Log()
    gate = asyncio.Event()
    async with new_app(any_url) as app:
        app.register(
            Saga(
                "Slow",
                steps=[
                    step("a", log.act("a"), compensate=log.undo("a")),
                    step("b", log.act("b", gate=gate), compensate=log.undo("b")),
                    step("c", log.act("c"), compensate=log.undo("c")),
                ],
            )
        )
        handle = await app.start("Slow", None)
        async with asyncio.timeout(5):
            while "do b" not in log.lines:
                await asyncio.sleep(0.01)
        await app.cancel(handle.id, reason="stop")
        await asyncio.sleep(0.1)
        assert (await app.get(handle.id)).state is SagaState.RUNNING  # b still runs
        gate.set()
        info = await settle(app, handle.id)
        assert info.state is SagaState.CANCELLED
        assert log.undos() == ["undo b", "undo a"]
        assert "do c" not in log.lines
        c = await check(app, handle.id)
        assert c.steps(Kind.STEP_COMPLETED) == [
            (Kind.STEP_COMPLETED, "a", 1),
            (Kind.STEP_COMPLETED, "b", 1),
        ]
        assert "c" not in {e.step for e in c.of(Kind.STEP_STARTED)}
        # b finished before the cancel was taken, and was compensated after
        kinds = c.kinds()
        b_done = next(i for i, e in enumerate(c.entries) if e.kind is Kind.STEP_COMPLETED
                      and e.step == "b")  # fmt: skip
        assert kinds.index(Kind.CANCEL_REQUESTED) > b_done
        assert kinds[-1] is Kind.SAGA_CANCELLED


# -- parallel groups ---------------------------------------------------------------------------


async def test_a_failing_parallel_group_is_compensated_then_the_earlier_steps(
    any_url: str, check: Check
) -> None:
    log = Log()
    overlap = asyncio.Barrier(2)
    async with new_app(any_url) as app:

        @app.saga("Fan")
        async def fan(ctx: WorkflowContext, data: Any) -> None:
            await ctx.step(log.act("first"), compensate=log.undo("first"))
            await ctx.parallel(
                ctx.step(log.act("x"), compensate=log.undo("x", overlap=overlap)),
                ctx.step(log.act("y"), compensate=log.undo("y", overlap=overlap)),
                ctx.step(log.act("z", fail=True), compensate=log.undo("z")),
            )
            await ctx.step(log.act("never"), compensate=log.undo("never"))

        handle = await app.start("Fan", None)
        info = await settle(app, handle.id)
        assert info.state is SagaState.FAILED
        assert info.error is not None
        assert "z failed" in info.error["message"]
        assert "do never" not in log.lines
        assert "undo z" not in log.undos()  # z never completed: nothing to undo
        undos = log.undos()
        assert sorted(undos[:2]) == ["undo x", "undo y"], log.lines
        assert undos[2:] == ["undo first"], log.lines
        # the group's compensations ran at once: both began before either ended
        assert sorted(log.lines[-6:-4]) == ["begin undo x", "begin undo y"], log.lines
        assert sorted(log.lines[-4:-2]) == ["undo x", "undo y"], log.lines
        c = await check(app, handle.id)
        groups = {(e.data or {}).get("group") for e in c.of(Kind.STEP_COMPLETED) if e.step in "xy"}
        assert len(groups) == 1
        assert None not in groups
        comp = [e.step for e in c.of(Kind.COMPENSATION_COMPLETED)]
        assert sorted(comp[:2]) == ["x", "y"]
        assert comp[2:] == ["first"]


# -- child sagas -------------------------------------------------------------------------------


def family(app: App, log: Log) -> None:
    app.register(
        Saga(
            "Shipment",
            steps=[
                step("pick", log.act("pick"), compensate=log.undo("pick")),
                step("pack", log.act("pack"), compensate=log.undo("pack")),
            ],
        )
    )

    @app.saga("Order")
    async def order(ctx: WorkflowContext, data: dict[str, Any]) -> Any:
        await ctx.step(log.act("reserve"), compensate=log.undo("reserve"))
        shipped = await ctx.child("Shipment", {"order": data["id"]})
        await ctx.step(log.act("charge", fail=data["fail"]), compensate=log.undo("charge"))
        return shipped


async def child_of(app: App, parent: Any) -> str:
    (started,) = [e for e in parent.of(Kind.STEP_STARTED) if e.step == "Shipment"]
    child_id = str((started.data or {})["child"])
    assert (await app.get(child_id)).parent_id == parent.info.id
    return child_id


async def test_a_child_sagas_output_is_the_parents_step_result(any_url: str, check: Check) -> None:
    log = Log()
    async with new_app(any_url) as app:
        family(app, log)
        handle = await app.start("Order", {"id": 1, "fail": False})
        assert await asyncio.wait_for(handle.result(), 5) == {"pick": "pick", "pack": "pack"}
        parent = await check(app, handle.id)
        child = await check(app, await child_of(app, parent))
        assert child.info.state is SagaState.COMPLETED
        assert log.lines == ["do reserve", "do pick", "do pack", "do charge"]


async def test_a_parent_failing_after_its_child_completed_compensates_the_child(
    any_url: str, check: Check
) -> None:
    log = Log()
    async with new_app(any_url) as app:
        family(app, log)
        handle = await app.start("Order", {"id": 2, "fail": True})
        info = await settle(app, handle.id)
        assert info.state is SagaState.FAILED
        assert log.undos() == ["undo pack", "undo pick", "undo reserve"], log.lines
        parent = await check(app, handle.id)
        child_id = await child_of(app, parent)
        child = await check(app, child_id)
        assert child.info.state is SagaState.FAILED
        assert child.info.error is not None
        assert child.info.error["type"] == "ParentCompensating"
        # the child had completed before the parent's failure reopened it
        kinds = child.kinds()
        assert kinds.index(Kind.SAGA_COMPLETED) < kinds.index(Kind.SAGA_COMPENSATING)
        assert [e.step for e in child.of(Kind.COMPENSATION_COMPLETED)] == ["pack", "pick"]
        # the parent compensated the child (as one step) before its own earlier step
        assert [e.step for e in parent.of(Kind.COMPENSATION_COMPLETED)] == [
            "Shipment",
            "reserve",
        ]


# -- an answer that comes after the approval window closed -------------------------------------


def approvals(url: str, budget: Path, **kw: Any) -> App:
    """The approval example with a window of 0.3 s."""
    return create_app(url, budget_path=budget, approval_days=0.3 / 86400, poll_interval=POLL,
                      **kw)  # fmt: skip


async def test_an_answer_after_the_approval_window_is_refused_while_a_worker_runs(
    any_url: str, tmp_path: Path, check: Check
) -> None:
    """The control for the test below: with a worker up throughout, the window closes at
    its time (the budget is released) and a late answer is refused."""
    async with approvals(any_url, tmp_path / "budget.db") as app:
        handle = await app.start(SAGA_TYPE, sample_request(1))
        await until_waiting(app, handle.id)
        await asyncio.sleep(0.6)
        with pytest.raises(InvalidSagaState):
            await handle.signal("approve", {"by": "ann"})
        info = await settle(app, handle.id)
        assert info.state is SagaState.FAILED
        assert info.error is not None
        assert info.error["type"] == "ApprovalExpired"
        assert budget_of(app).orders("PR-0001") == []
        assert budget_of(app).held("PR-0001") == 0
        await check(app, handle.id)


async def test_an_answer_after_the_approval_window_is_refused_also_when_no_worker_ran(
    any_url: str, tmp_path: Path, check: Check
) -> None:
    """The approval example says a worker restart changes nothing. Here no worker runs while
    the 0.3 s window closes; an approval arrives 0.3 s after it closed; then a worker starts.
    The request must expire as it would have with a worker up (see the test above), not take
    the late approval and place the order (as it did before 338c6e8 compared a signal's
    arrival with its wait's timeout)."""
    budget = tmp_path / "budget.db"
    async with approvals(any_url, budget) as first:
        handle = await first.start(SAGA_TYPE, sample_request(1))
        await until_waiting(first, handle.id)
    await asyncio.sleep(0.6)
    async with approvals(any_url, budget, worker=False) as sender:
        assert await sender.signal(handle.id, "approve", {"by": "ann"})
    async with approvals(any_url, budget) as second:
        info = await settle(second, handle.id)
        c = await check(second, handle.id)
        (waiting,) = c.of(Kind.SIGNAL_WAITING)
        (late,) = await second.store.signals(handle.id)
        assert late.at > float((waiting.data or {})["until"]) + 0.2  # the premise holds
        assert budget_of(second).orders("PR-0001") == [], "a late approval placed an order"
        assert info.state is SagaState.FAILED, info.state
        assert info.error is not None
        assert info.error["type"] == "ApprovalExpired"
        assert Kind.SIGNAL_RECEIVED not in c.kinds()
