"""Durable timers and signals: the saga is unloaded while it waits and resumed from its journal
when the time comes or the signal arrives, also across a restart of the App."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sagakit import (
    App,
    ConfigurationError,
    InvalidSagaState,
    Kind,
    SagaNotFound,
    SagaState,
    SignalTimedOut,
    VirtualClock,
    WorkflowContext,
    step,
)
from sagakit.definition import Saga
from sagakit.testing import until_waiting

Check = Callable[[App, str], Awaitable[Any]]

DAY = timedelta(days=1)


async def reserve(ctx: Any, data: Any) -> str:
    return "r1"


async def release(ctx: Any, data: Any, result: Any) -> None:
    RELEASED.append(result)


RELEASED: list[Any] = []


def approval_app(url: str, clock: VirtualClock | None = None, **kw: Any) -> App:
    app = App(url, poll_interval=0.05, clock=clock or VirtualClock(), **kw)

    @app.saga("Nap")
    async def nap(ctx: WorkflowContext, data: dict[str, Any]) -> str:
        before = ctx.now()
        await ctx.sleep(timedelta(days=3))
        after = ctx.now()
        return f"{(after - before).days}"

    @app.saga("Approval")
    async def approval(ctx: WorkflowContext, data: dict[str, Any]) -> Any:
        await ctx.step(reserve, data, compensate=release)
        try:
            decision = await ctx.wait_for_signal("decision", timeout=2 * DAY)
        except SignalTimedOut:
            raise
        if not decision.get("approve"):
            raise RuntimeError(f"rejected by {decision.get('by')}")
        return decision

    return app


async def wait_state(app: App, saga_id: str, *states: SagaState, timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        while (info := await app.get(saga_id)).state not in states:
            await asyncio.sleep(0.01)
    return info


async def test_three_day_sleep_in_virtual_time_unloads_the_saga(db_url: str, check: Check) -> None:
    clock = VirtualClock()
    async with approval_app(db_url, clock) as app:
        handle = await app.start("Nap", {})
        await until_waiting(app, handle.id)
        async with asyncio.timeout(1):  # unloaded: its run ends just after the suspend
            while handle.id in app._runner.tasks:  # type: ignore[union-attr]
                await asyncio.sleep(0.001)
        await clock.advance(timedelta(days=2, hours=23))
        assert (await app.get(handle.id)).state is SagaState.RUNNING
        await clock.advance(timedelta(hours=1))
        assert await asyncio.wait_for(handle.result(), 5) == "3"
        c = await check(app, handle.id)
        timers = c.of(Kind.TIMER_STARTED, Kind.TIMER_FIRED)
        assert [e.kind for e in timers] == [Kind.TIMER_STARTED, Kind.TIMER_FIRED]
        assert timers[1].at >= (timers[0].data or {})["until"]


async def test_sleep_survives_a_restart_and_never_fires_early(db_url: str) -> None:
    clock = VirtualClock()
    async with approval_app(db_url, clock) as app:
        handle = await app.start("Nap", {})
        await until_waiting(app, handle.id)
    await clock.advance(timedelta(days=1))
    async with approval_app(db_url, clock) as app:
        await asyncio.sleep(0.2)
        assert (await app.get(handle.id)).state is SagaState.RUNNING  # 2 days still to go
        await clock.advance(timedelta(days=2))
        assert await asyncio.wait_for(app.handle(handle.id).result(), 5) == "3"


async def test_real_time_sleep_on_the_system_clock(db_url: str) -> None:
    async with App(db_url, poll_interval=5) as app:

        @app.saga("Short")
        async def short(ctx: WorkflowContext, data: Any) -> float:
            await ctx.sleep(0.3)
            return 1.0

        started = asyncio.get_running_loop().time()
        handle = await app.start("Short", None)
        assert await asyncio.wait_for(handle.result(), 5) == 1.0
        took = asyncio.get_running_loop().time() - started
        assert 0.3 <= took < 3  # woken by its due time, not by the 5 s poll


async def test_signal_sent_while_waiting_is_delivered(db_url: str, check: Check) -> None:
    async with approval_app(db_url) as app:
        handle = await app.start("Approval", {"amount": 10})
        await until_waiting(app, handle.id)
        assert await app.signal(handle.id, "decision", {"approve": True, "by": "ann"})
        assert await asyncio.wait_for(handle.result(), 5) == {"approve": True, "by": "ann"}
        c = await check(app, handle.id)
        (received,) = c.of(Kind.SIGNAL_RECEIVED)
        assert (received.data or {})["name"] == "decision"


async def test_signal_sent_before_the_saga_waits_is_kept(db_url: str) -> None:
    clock = VirtualClock()
    writer = approval_app(db_url, clock, worker=False)
    handle = await writer.start("Approval", {"amount": 10})
    await writer.signal(handle.id, "decision", {"approve": True, "by": "early"})
    await writer.close()
    async with approval_app(db_url, clock) as app:
        assert await asyncio.wait_for(app.handle(handle.id).result(), 5) == {
            "approve": True,
            "by": "early",
        }


async def test_a_repeated_signal_id_is_delivered_once(db_url: str) -> None:
    async with approval_app(db_url) as app:

        @app.saga("Two")
        async def two(ctx: WorkflowContext, data: Any) -> list[Any]:
            first = await ctx.wait_for_signal("n")
            second = await ctx.wait_for_signal("n", timeout=60)
            return [first, second]

        handle = await app.start("Two", None)
        assert await app.signal(handle.id, "n", 1, signal_id="a")
        assert not await app.signal(handle.id, "n", 1, signal_id="a")
        assert await app.signal(handle.id, "n", 2, signal_id="b")
        assert await asyncio.wait_for(handle.result(), 5) == [1, 2]


async def test_signal_timeout_compensates(db_url: str, check: Check) -> None:
    RELEASED.clear()
    clock = VirtualClock()
    async with approval_app(db_url, clock) as app:
        handle = await app.start("Approval", {"amount": 10})
        await until_waiting(app, handle.id)
        await clock.advance(2 * DAY)
        info = await wait_state(app, handle.id, SagaState.FAILED)
        assert info.error is not None
        assert info.error["type"] == "SignalTimedOut"
        assert RELEASED == ["r1"]
        c = await check(app, handle.id)
        assert Kind.SIGNAL_TIMED_OUT in c.kinds()


async def test_rejection_compensates(db_url: str) -> None:
    RELEASED.clear()
    async with approval_app(db_url) as app:
        handle = await app.start("Approval", {"amount": 10})
        await app.signal(handle.id, "decision", {"approve": False, "by": "bob"})
        info = await wait_state(app, handle.id, SagaState.FAILED)
        assert "rejected by bob" in str(info.error)
        assert RELEASED == ["r1"]


async def test_bad_signals_are_refused_and_write_nothing(db_url: str, tmp_path: Path) -> None:
    async with approval_app(db_url) as app:
        with pytest.raises(SagaNotFound):
            await app.signal("nope", "decision", {})
        handle = await app.start("Nap", {})
        with pytest.raises(ConfigurationError, match=r"sagakit\."):
            await app.signal(handle.id, "sagakit.cancel", {})
        with pytest.raises(ConfigurationError):
            await app.signal(handle.id, "", {})
        from sagakit.errors import NotSerializable

        with pytest.raises(NotSerializable):
            await app.signal(handle.id, "x", object())
        assert await app.store.signals(handle.id) == []
        await app.cancel(handle.id, reason="stop")
        await wait_state(app, handle.id, SagaState.CANCELLED)
        with pytest.raises(InvalidSagaState, match="cancelled"):
            await app.signal(handle.id, "x", 1)


async def test_sleep_until_takes_an_aware_datetime(db_url: str) -> None:
    clock = VirtualClock(datetime(2030, 1, 1, tzinfo=UTC))
    async with App(db_url, poll_interval=0.05, clock=clock) as app:

        @app.saga("Until")
        async def until(ctx: WorkflowContext, data: Any) -> str:
            await ctx.sleep_until(datetime(2030, 1, 5, tzinfo=UTC))
            return ctx.now().isoformat()

        @app.saga("Naive")
        async def naive(ctx: WorkflowContext, data: Any) -> None:
            await ctx.sleep_until(datetime(2030, 1, 5))

        handle = await app.start("Until", None)
        await until_waiting(app, handle.id)
        await clock.advance(timedelta(days=4))
        assert (await asyncio.wait_for(handle.result(), 5)).startswith("2030-01-05")
        bad = await app.start("Naive", None)
        info = await wait_state(app, bad.id, SagaState.FAILED)
        assert info.error is not None
        assert "timezone-aware" in info.error["message"]


async def test_saga_deadline_interrupts_a_long_sleep(db_url: str) -> None:
    clock = VirtualClock()
    async with App(db_url, poll_interval=0.05, clock=clock) as app:
        app.register(Saga("Deadline", workflow=_sleepy, deadline=3600))
        handle = await app.start("Deadline", None)
        await until_waiting(app, handle.id)
        await clock.advance(timedelta(hours=1))
        info = await wait_state(app, handle.id, SagaState.FAILED)
        assert info.error is not None
        assert info.error["type"] == "SagaDeadlineExceeded"
        assert RELEASED[-1] == "r1"


async def _sleepy(ctx: WorkflowContext, data: Any) -> None:
    await ctx.step(reserve, data, compensate=release)
    await ctx.sleep(DAY)
    await ctx.step(reserve, data, name="after")


async def test_declarative_and_timer_journal_round_trip(db_url: str, check: Check) -> None:
    """A replay after the timer fired takes the recorded path (no second TIMER_STARTED)."""
    clock = VirtualClock()
    async with App(db_url, poll_interval=0.05, clock=clock) as app:
        app.register(Saga("Steps", steps=[step("reserve", reserve, compensate=release)]))
        app.register(Saga("Sleepy", workflow=_sleepy))
        handle = await app.start("Sleepy", None)
        await until_waiting(app, handle.id)
        await clock.advance(DAY)
        await asyncio.wait_for(handle.result(), 5)
        c = await check(app, handle.id)
        assert [e.kind for e in c.of(Kind.TIMER_STARTED)] == [Kind.TIMER_STARTED]
        assert c.steps(Kind.STEP_COMPLETED) == [
            (Kind.STEP_COMPLETED, "reserve", 1),
            (Kind.STEP_COMPLETED, "after", 1),
        ]


HANG: list[int] = []


async def hang(ctx: Any, data: Any) -> None:
    HANG.append(ctx.attempt)
    await asyncio.Event().wait()


def timeout_app(url: str, clock: VirtualClock) -> App:
    app = App(url, poll_interval=0.05, clock=clock)
    app.register(
        Saga(
            "Slow",
            steps=[
                step("reserve", reserve, compensate=release),
                step("call", hang, timeout=10),
            ],
        )
    )
    return app


async def test_step_timeout_holds_across_a_restart(db_url: str, check: Check) -> None:
    """A step started before a crash times out at its original deadline, not 10 s after."""
    HANG.clear()
    RELEASED.clear()
    clock = VirtualClock()
    async with timeout_app(db_url, clock) as app:
        handle = await app.start("Slow", None)
        async with asyncio.timeout(5):
            while not HANG:
                await asyncio.sleep(0.01)
    await clock.advance(4)  # down for 4 of the step's 10 s
    async with timeout_app(db_url, clock) as app:
        async with asyncio.timeout(5):
            while len(HANG) < 2:  # the attempt is re-run with what is left of its time
                await asyncio.sleep(0.01)
        await clock.advance(5.9)
        assert (await app.get(handle.id)).state is SagaState.RUNNING
        await clock.advance(0.2)
        info = await wait_state(app, handle.id, SagaState.FAILED)
        assert info.error is not None
        assert "timed out after 10" in info.error["message"]
        assert RELEASED == ["r1"]
        c = await check(app, handle.id)
        starts = [e for e in c.of(Kind.STEP_STARTED) if e.step == "call"]
        assert len(starts) == 2
        assert {(e.data or {})["ends"] for e in starts} == {(starts[0].data or {})["ends"]}


async def test_step_deadline_passed_while_down_times_out_without_running(db_url: str) -> None:
    HANG.clear()
    clock = VirtualClock()
    async with timeout_app(db_url, clock) as app:
        handle = await app.start("Slow", None)
        async with asyncio.timeout(5):
            while not HANG:
                await asyncio.sleep(0.01)
    await clock.advance(60)
    async with timeout_app(db_url, clock) as app:
        info = await wait_state(app, handle.id, SagaState.FAILED)
        assert info.error is not None
        assert "timed out after 10" in info.error["message"]
        assert HANG == [1]  # not run again: its time was up
