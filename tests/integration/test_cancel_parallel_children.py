"""Cancellation, parallel groups, child sagas and step kinds, on a real SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from sagakit import (
    App,
    InvalidSagaState,
    Kind,
    RetryPolicy,
    SagaState,
    StepFailed,
    VirtualClock,
    WorkflowContext,
    parallel,
    step,
)
from sagakit.definition import Saga

Check = Callable[[App, str], Awaitable[Any]]
LOG: list[str] = []


def act(name: str, *, fail: bool = False, delay: float = 0.0) -> Any:
    async def action(ctx: Any, data: Any) -> str:
        LOG.append(f"do {name}")
        if delay:
            await asyncio.sleep(delay)
        if fail:
            raise RuntimeError(f"{name} failed")
        return name

    action.__name__ = name
    return action


def undo(name: str, *, delay: float = 0.0) -> Any:
    async def compensation(ctx: Any, data: Any, result: Any) -> None:
        if delay:
            await asyncio.sleep(delay)
        LOG.append(f"undo {name}")

    return compensation


async def settle(app: App, saga_id: str, timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        return await app.wait(saga_id)


@pytest.fixture(autouse=True)
def _clear_log() -> None:
    LOG.clear()


# -- cancellation ------------------------------------------------------------------------------


async def test_cancel_while_waiting_compensates_and_ends_cancelled(
    db_url: str, check: Check
) -> None:
    async with App(db_url, poll_interval=0.05) as app:

        @app.saga("Waits")
        async def waits(ctx: WorkflowContext, data: Any) -> None:
            await ctx.step(act("a"), compensate=undo("a"))
            await ctx.step(act("b"), compensate=undo("b"))
            await ctx.wait_for_signal("go")
            await ctx.step(act("c"), compensate=undo("c"))

        handle = await app.start("Waits", None)
        async with asyncio.timeout(5):
            while (await app.get(handle.id)).waiting is False:
                await asyncio.sleep(0.01)
        await handle.cancel("customer changed their mind")
        info = await settle(app, handle.id)
        assert info.state is SagaState.CANCELLED
        assert LOG == ["do a", "do b", "undo b", "undo a"]
        c = await check(app, handle.id)
        (request,) = c.of(Kind.CANCEL_REQUESTED)
        assert (request.data or {})["reason"] == "customer changed their mind"
        assert c.kinds()[-1] is Kind.SAGA_CANCELLED
        with pytest.raises(InvalidSagaState):
            await app.cancel(handle.id)


async def test_cancel_during_a_step_lets_it_finish_and_compensates_it(
    db_url: str, check: Check
) -> None:
    async with App(db_url, poll_interval=0.05) as app:
        app.register(
            Saga(
                "Slow",
                steps=[
                    step("a", act("a"), compensate=undo("a")),
                    step("b", act("b", delay=0.4), compensate=undo("b")),
                    step("c", act("c"), compensate=undo("c")),
                ],
            )
        )
        handle = await app.start("Slow", None)
        async with asyncio.timeout(5):
            while "do b" not in LOG:
                await asyncio.sleep(0.01)
        await app.cancel(handle.id, reason="stop")
        info = await settle(app, handle.id)
        assert info.state is SagaState.CANCELLED
        # b was running when the cancel came: it finished and was compensated, c never ran
        assert LOG == ["do a", "do b", "undo b", "undo a"]


async def test_cancel_from_another_process_is_seen_by_polling(db_url: str) -> None:
    async with App(db_url, poll_interval=0.05) as app:
        app.register(
            Saga(
                "Slow",
                steps=[
                    step("a", act("a", delay=0.3), compensate=undo("a")),
                    step("b", act("b"), compensate=undo("b")),
                ],
            )
        )
        handle = await app.start("Slow", None)
        other = App(db_url, worker=False)
        other.register(app.definition("Slow"))  # type: ignore[arg-type]
        await other.cancel(handle.id, reason="from the CLI")
        await other.close()
        info = await settle(app, handle.id)
        assert info.state is SagaState.CANCELLED
        assert LOG == ["do a", "undo a"]


async def test_cancel_a_parked_saga_compensates_it(db_url: str, check: Check) -> None:
    clock = VirtualClock()

    async def napper(ctx: WorkflowContext, data: Any) -> None:
        await ctx.step(act("a"), compensate=undo("a"))
        await ctx.sleep(timedelta(hours=1))
        await ctx.step(act("b"), compensate=undo("b"))

    async with App(db_url, poll_interval=0.05, clock=clock) as app:
        app.register(Saga("Napper", workflow=napper))
        handle = await app.start("Napper", None)
        async with asyncio.timeout(5):
            while not (await app.get(handle.id)).waiting:
                await asyncio.sleep(0.01)
    await clock.advance(timedelta(hours=2))
    # a deployment without version 1: the woken saga is parked
    async with App(db_url, poll_interval=0.05, clock=clock) as app:
        app.register(Saga("Napper", workflow=napper, version=2))
        info = await settle(app, handle.id)
        assert info.state is SagaState.NEEDS_ATTENTION
    async with App(db_url, poll_interval=0.05, clock=clock) as app:
        app.register(Saga("Napper", workflow=napper))
        await app.cancel(handle.id, reason="give up")
        info = await settle(app, handle.id)
        assert info.state is SagaState.CANCELLED
        assert LOG == ["do a", "undo a"]
        c = await check(app, handle.id)
        assert Kind.SAGA_PARKED in c.kinds()
        assert c.kinds()[-1] is Kind.SAGA_CANCELLED


async def test_cancel_is_refused_past_the_pivot(db_url: str) -> None:
    async with App(db_url, poll_interval=0.05) as app:

        @app.saga("Pivoted")
        async def pivoted(ctx: WorkflowContext, data: Any) -> None:
            await ctx.step(act("reserve"), compensate=undo("reserve"))
            await ctx.step(act("charge"), pivot=True)
            await ctx.wait_for_signal("shipped")

        handle = await app.start("Pivoted", None)
        async with asyncio.timeout(5):
            while (await app.get(handle.id)).waiting is False:
                await asyncio.sleep(0.01)
        with pytest.raises(InvalidSagaState, match="pivot"):
            await app.cancel(handle.id)
        await app.signal(handle.id, "shipped", True)
        assert (await settle(app, handle.id)).state is SagaState.COMPLETED


# -- parallel groups ---------------------------------------------------------------------------


async def test_parallel_group_failure_compensates_the_group_then_earlier_steps(
    db_url: str, check: Check
) -> None:
    async with App(db_url, poll_interval=0.05) as app:
        app.register(
            Saga(
                "Fan",
                steps=[
                    step("first", act("first"), compensate=undo("first")),
                    parallel(
                        step("x", act("x", delay=0.05), compensate=undo("x", delay=0.1)),
                        step("y", act("y", delay=0.1), compensate=undo("y", delay=0.1)),
                        step("z", act("z", fail=True), compensate=undo("z")),
                    ),
                    step("never", act("never")),
                ],
            )
        )
        handle = await app.start("Fan", None)
        info = await settle(app, handle.id)
        assert info.state is SagaState.FAILED
        assert "do never" not in LOG
        assert "undo z" not in LOG  # z failed: nothing to undo
        undos = [line for line in LOG if line.startswith("undo")]
        assert sorted(undos[:2]) == ["undo x", "undo y"]
        assert undos[2:] == ["undo first"]
        c = await check(app, handle.id)
        groups = {(e.data or {}).get("group") for e in c.of(Kind.STEP_COMPLETED) if e.step in "xy"}
        assert len(groups) == 1
        assert None not in groups
        # the group's compensations overlapped: both started before either completed
        comp = [
            (e.kind, e.step) for e in c.of(Kind.COMPENSATION_STARTED, Kind.COMPENSATION_COMPLETED)
        ]
        assert [k for k, _ in comp[:2]] == [Kind.COMPENSATION_STARTED] * 2


async def test_code_first_parallel_returns_results_in_order(db_url: str) -> None:
    async with App(db_url, poll_interval=0.05) as app:

        @app.saga("Par")
        async def par(ctx: WorkflowContext, data: Any) -> list[Any]:
            got = await ctx.parallel(
                ctx.step(act("slow", delay=0.1)), ctx.step(act("fast")), ctx.sleep(0.05)
            )
            return list(got)

        handle = await app.start("Par", None)
        assert await asyncio.wait_for(handle.result(), 5) == ["slow", "fast", None]

        @app.saga("Wrong")
        async def wrong(ctx: WorkflowContext, data: Any) -> None:
            async def branch() -> None:
                await ctx.step(act("a"))

            await ctx.parallel(branch())

        bad = await app.start("Wrong", None)
        info = await settle(app, bad.id)
        assert info.state is SagaState.FAILED
        assert info.error is not None
        assert "one per branch" in info.error["message"]


# -- step kinds --------------------------------------------------------------------------------


async def test_engine_follows_the_step_kinds(db_url: str) -> None:
    flaky = {"n": 0}

    async def ship(ctx: Any, data: Any) -> str:
        flaky["n"] += 1
        if flaky["n"] < 4:
            raise ConnectionError("carrier down")
        return "shipped"

    from sagakit import RetryPolicy

    fast = RetryPolicy(initial_interval=0.01, max_interval=0.01)
    async with App(db_url, poll_interval=0.05) as app:
        app.register(
            Saga(
                "Kinds",
                steps=[
                    step("reserve", act("reserve"), compensate=undo("reserve")),
                    step("charge", act("charge"), pivot=True),
                    step("ship", ship, retriable=True, retry=fast),
                    step(
                        "notify",
                        act("notify", fail=True),
                        retriable=True,
                        retry=RetryPolicy(non_retryable=(RuntimeError,)),
                    ),
                ],
            )
        )
        handle = await app.start("Kinds", None)
        info = await settle(app, handle.id)
        # ship was retried past the default 3 attempts; notify failed for good after the
        # pivot: nothing is compensated, the saga waits for an operator
        assert flaky["n"] == 4
        assert info.state is SagaState.NEEDS_ATTENTION
        assert info.error is not None
        assert info.error["type"] == "PastPivot"
        assert not [line for line in LOG if line.startswith("undo")]

        failing_pivot = Saga(
            "PivotFails",
            steps=[
                step("reserve", act("reserve"), compensate=undo("reserve")),
                step("charge", act("charge", fail=True), pivot=True),
            ],
        )
        app.register(failing_pivot)
        LOG.clear()
        info = await settle(app, (await app.start("PivotFails", None)).id)
        assert info.state is SagaState.FAILED
        assert LOG == ["do reserve", "do charge", "undo reserve"]


# -- child sagas -------------------------------------------------------------------------------


def family_app(url: str, **kw: Any) -> App:
    app = App(url, poll_interval=0.05, **kw)
    app.register(
        Saga(
            "Shipment",
            steps=[
                step("pick", act("pick"), compensate=undo("pick")),
                step("pack", act("pack"), compensate=undo("pack")),
            ],
        )
    )

    @app.saga("Order")
    async def order(ctx: WorkflowContext, data: dict[str, Any]) -> Any:
        await ctx.step(act("reserve"), compensate=undo("reserve"))
        shipped = await ctx.child("Shipment", {"order": data["id"]})
        await ctx.step(act("charge", fail=data.get("fail", False)), compensate=undo("charge"))
        return shipped

    return app


async def test_child_saga_output_is_the_step_result(db_url: str, check: Check) -> None:
    async with family_app(db_url) as app:
        handle = await app.start("Order", {"id": 1})
        assert await asyncio.wait_for(handle.result(), 5) == {"pick": "pick", "pack": "pack"}
        c = await check(app, handle.id)
        (started,) = [e for e in c.of(Kind.STEP_STARTED) if e.step == "Shipment"]
        child_id = (started.data or {})["child"]
        child = await app.get(child_id)
        assert child.parent_id == handle.id
        assert child.state is SagaState.COMPLETED


async def test_parent_compensation_runs_the_childs_compensation_path(db_url: str) -> None:
    async with family_app(db_url) as app:
        handle = await app.start("Order", {"id": 2, "fail": True})
        info = await settle(app, handle.id, timeout=10)
        assert info.state is SagaState.FAILED
        assert LOG == [
            "do reserve", "do pick", "do pack", "do charge",
            "undo pack", "undo pick", "undo reserve",
        ]  # fmt: skip
        (child,) = list(await app.list(saga_type="Shipment"))
        assert child.state is SagaState.FAILED
        assert child.error is not None
        assert child.error["type"] == "ParentCompensating"


async def test_a_child_resolved_by_an_operator_wakes_its_parent_at_once(any_url: str) -> None:
    """resolve() ends a parked child outside any worker run; the parent, unloaded while it
    waits for the child, must hear of it then, not at its 60 s re-check."""

    async def cannot_release(ctx: Any, data: Any, result: Any) -> None:
        raise ConnectionError("the warehouse is offline")

    app = App(any_url, poll_interval=0.05)
    app.register(
        Saga(
            "Fragile",
            steps=[
                step("hold", act("hold"), compensate=cannot_release,
                     compensate_retry=RetryPolicy(max_attempts=1)),
                step("ship", act("ship", fail=True)),
            ],
        )
    )  # fmt: skip

    @app.saga("Parent")
    async def parent(ctx: WorkflowContext, data: Any) -> Any:
        try:
            return await ctx.child("Fragile", None)
        except StepFailed as exc:
            return f"child ended: {exc.error_type}"

    async with app:
        handle = await app.start("Parent", None)
        async with asyncio.timeout(5):
            while not (kids := await app.list(saga_type="Fragile", state="needs_attention")):
                await asyncio.sleep(0.02)
        # The child's parking wakes the parent, which looks and waits again: resolve only
        # once it waits, so that nothing but the resolve can end its wait.
        async with asyncio.timeout(5):
            while not (await app.get(handle.id)).waiting:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert (await app.get(handle.id)).waiting
        await app.resolve(kids[0].id, "released the hold by hand")
        result = await asyncio.wait_for(handle.result(), 5)  # well before the 60 s re-check
        assert result.startswith("child ended")


async def test_child_survives_a_restart_of_the_parent(db_url: str) -> None:
    clock = VirtualClock()
    app = family_app(db_url, clock=clock)

    @app.saga("Sleepy")
    async def sleepy(ctx: WorkflowContext, data: Any) -> str:
        await ctx.sleep(timedelta(hours=1))
        return "woke"

    @app.saga("Parent")
    async def parent(ctx: WorkflowContext, data: Any) -> Any:
        return await ctx.child("Sleepy", None)

    async with app:
        handle = await app.start("Parent", None)
        async with asyncio.timeout(5):
            while len(await app.list(saga_type="Sleepy")) == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
    await clock.advance(timedelta(hours=2))
    async with app:
        await clock.advance(timedelta(seconds=1))
        assert await asyncio.wait_for(app.handle(handle.id).result(), 5) == "woke"
        assert len(await app.list(saga_type="Sleepy")) == 1  # started once
