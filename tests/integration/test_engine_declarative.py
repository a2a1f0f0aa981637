"""Declarative sagas on a real SQLite file: compensation order, retries, timeouts, deadlines,
and sync and async step functions mixed in one saga."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from sagakit import (
    App,
    Kind,
    RetryPolicy,
    Saga,
    SagaFailed,
    SagaState,
    step,
)

FAST = 0.001
ORDER_STEPS = ("reserve", "charge", "ship", "confirm")
ORDER = {"order": "A-1", "items": [{"sku": "X", "qty": 2}]}


def order_saga(calls: Any, fail_at: str | None, name: str = "Order") -> Saga:
    """reserve/charge/ship/confirm, each with a compensation; ``fail_at`` raises."""

    def make(step_name: str) -> Any:
        async def action(ctx: Any, data: Any) -> dict[str, Any]:
            calls.add(
                step_name,
                data=data,
                key=ctx.idempotency_key,
                attempt=ctx.attempt,
                results=dict(ctx.results),
            )
            await asyncio.sleep(0)
            if step_name == fail_at:
                raise RuntimeError(f"{step_name} service is down")
            return {"done": step_name, "order": data["order"]}

        async def compensate(ctx: Any, data: Any, result: Any) -> None:
            calls.add(
                f"undo_{step_name}",
                data=data,
                result=result,
                key=ctx.idempotency_key,
                attempt=ctx.attempt,
            )

        return step(step_name, action, compensate=compensate)

    return Saga(name, steps=[make(s) for s in ORDER_STEPS])


# -- 1. compensation order ---------------------------------------------------------------------


@pytest.mark.parametrize("fail_at", ORDER_STEPS)
async def test_failure_at_each_step_compensates_completed_steps_in_reverse(
    app: App, calls: Any, check: Any, fail_at: str
) -> None:
    app.register(order_saga(calls, fail_at))
    handle = await app.start("Order", ORDER)

    with pytest.raises(SagaFailed) as raised:
        await handle.result(timeout=5)
    assert raised.value.state == "failed"
    assert raised.value.saga_id == handle.id

    failed_at = ORDER_STEPS.index(fail_at)
    completed = list(ORDER_STEPS[:failed_at])
    undone = [f"undo_{s}" for s in reversed(completed)]
    assert calls.names() == [*completed, fail_at, *undone]

    for s in completed:
        (seen,) = calls.of(f"undo_{s}")
        assert seen["data"] == ORDER, "a compensation receives the step's input"
        assert seen["result"] == {"done": s, "order": "A-1"}, "...and the step's result"
        assert seen["key"] == f"{handle.id}/{s}/compensate"
        assert seen["attempt"] == 1
    for i, s in enumerate(ORDER_STEPS[: failed_at + 1]):
        (seen,) = calls.of(s)
        assert seen["key"] == f"{handle.id}/{s}"
        assert seen["data"] == ORDER
        assert seen["results"] == {c: {"done": c, "order": "A-1"} for c in ORDER_STEPS[:i]}

    c = await check(app, handle.id)
    assert c.info.state is SagaState.FAILED
    expected = [Kind.SAGA_STARTED]
    for _ in completed:
        expected += [Kind.STEP_STARTED, Kind.STEP_COMPLETED]
    expected += [Kind.STEP_STARTED, Kind.STEP_FAILED, Kind.SAGA_COMPENSATING]
    for _ in completed:
        expected += [Kind.COMPENSATION_STARTED, Kind.COMPENSATION_COMPLETED]
    expected += [Kind.SAGA_FAILED]
    assert c.kinds() == expected

    done_order = [e.step for e in c.of(Kind.STEP_COMPLETED)]
    assert done_order == completed
    assert [e.step for e in c.of(Kind.COMPENSATION_COMPLETED)] == done_order[::-1]
    # Each compensation entry refers to the seq of the step it undoes.
    seq_of = {e.step: e.seq for e in c.of(Kind.STEP_COMPLETED)}
    assert all(e.seq == seq_of[e.step] for e in c.of(Kind.COMPENSATION_STARTED))

    (failed,) = c.of(Kind.STEP_FAILED)
    assert (failed.step, failed.attempt) == (fail_at, 1)
    assert failed.error is not None
    assert failed.error["type"] == "RuntimeError"
    assert failed.error["message"] == f"{fail_at} service is down"
    (comp,) = c.of(Kind.SAGA_COMPENSATING)
    assert comp.error is not None
    assert comp.error["type"] == "StepFailed"
    assert f"{fail_at} service is down" in comp.error["message"]
    assert c.projection.owed() == []
    assert c.projection.compensated == set(seq_of.values())
    assert raised.value.error == c.info.error


async def test_no_failure_completes_with_every_result_and_no_compensation(
    app: App, calls: Any, check: Any
) -> None:
    app.register(order_saga(calls, None))
    handle = await app.start("Order", ORDER)

    output = await handle.result(timeout=5)
    assert output == {s: {"done": s, "order": "A-1"} for s in ORDER_STEPS}
    assert calls.names() == list(ORDER_STEPS)

    c = await check(app, handle.id)
    assert c.info.state is SagaState.COMPLETED
    assert c.info.output == output
    assert c.info.input == ORDER
    assert c.info.error is None
    assert c.kinds() == [
        Kind.SAGA_STARTED,
        *[Kind.STEP_STARTED, Kind.STEP_COMPLETED] * 4,
        Kind.SAGA_COMPLETED,
    ]
    assert [e.step for e in c.of(Kind.STEP_COMPLETED)] == list(ORDER_STEPS)
    assert all(e.attempt == 1 for e in c.of(Kind.STEP_STARTED, Kind.STEP_COMPLETED))
    assert [e.seq for e in c.of(Kind.STEP_COMPLETED)] == [0, 1, 2, 3]
    assert c.projection.reruns == 0
    assert c.projection.step_starts == 4
    assert c.info.current_step == "confirm"
    status = await handle.status()
    assert status.state is SagaState.COMPLETED
    assert status.output == output


# -- 2. retries --------------------------------------------------------------------------------


async def test_step_fails_twice_then_succeeds(app: App, calls: Any, check: Any) -> None:
    failures = {"left": 2}

    async def flaky(ctx: Any, data: Any) -> str:
        calls.add("flaky", attempt=ctx.attempt, key=ctx.idempotency_key)
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError(f"flaky attempt {ctx.attempt}")
        return "paid"

    policy = RetryPolicy(max_attempts=3, initial_interval=FAST, retry_on=(ConnectionError,))
    app.register(Saga("Retry", steps=[step("pay", flaky, retry=policy)]))
    handle = await app.start("Retry", {"n": 1})

    assert await handle.result(timeout=5) == {"pay": "paid"}
    seen = calls.of("flaky")
    assert [s["attempt"] for s in seen] == [1, 2, 3]
    assert {s["key"] for s in seen} == {f"{handle.id}/pay"}

    c = await check(app, handle.id)
    assert c.info.state is SagaState.COMPLETED
    assert c.steps(Kind.STEP_STARTED, Kind.STEP_RETRYING, Kind.STEP_COMPLETED) == [
        (Kind.STEP_STARTED, "pay", 1),
        (Kind.STEP_RETRYING, "pay", 1),
        (Kind.STEP_STARTED, "pay", 2),
        (Kind.STEP_RETRYING, "pay", 2),
        (Kind.STEP_STARTED, "pay", 3),
        (Kind.STEP_COMPLETED, "pay", 3),
    ]
    for e, n in zip(c.of(Kind.STEP_RETRYING), (1, 2), strict=True):
        assert e.error == {
            "type": "ConnectionError",
            "module": "builtins",
            "message": f"flaky attempt {n}",
        }
        assert e.data is not None
        assert 0 <= e.data["retry_in"] < 0.01
    assert c.of(Kind.STEP_FAILED) == []
    assert c.of(Kind.SAGA_COMPENSATING) == []
    assert c.projection.step_starts == 3


async def test_ordinary_retries_are_not_counted_as_reruns(app: App, check: Any) -> None:
    """``Projection.reruns`` counts bodies re-run after a recovery, not planned retries."""
    failures = {"left": 2}

    async def flaky(ctx: Any, data: Any) -> str:
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("try again")
        return "ok"

    policy = RetryPolicy(max_attempts=3, initial_interval=FAST)
    app.register(Saga("Reruns", steps=[step("s", flaky, retry=policy)]))
    handle = await app.start("Reruns")
    assert await handle.result(timeout=5) == {"s": "ok"}
    c = await check(app, handle.id)
    assert c.projection.step_starts == 3
    assert c.projection.reruns == 0, "step_retrying(n) + step_started(n+1) is not a re-run"


async def test_retries_exhausted_compensate(app: App, calls: Any, check: Any) -> None:
    async def book(ctx: Any, data: Any) -> str:
        return "booked"

    async def unbook(ctx: Any, data: Any, result: Any) -> None:
        calls.add("unbook", result=result)

    async def always_fails(ctx: Any, data: Any) -> None:
        calls.add("pay", attempt=ctx.attempt)
        raise ConnectionError("card network unreachable")

    policy = RetryPolicy(max_attempts=3, initial_interval=FAST)
    app.register(
        Saga(
            "Exhaust",
            steps=[step("book", book, compensate=unbook), step("pay", always_fails, retry=policy)],
        )
    )
    handle = await app.start("Exhaust")
    with pytest.raises(SagaFailed) as raised:
        await handle.result(timeout=5)
    assert raised.value.state is SagaState.FAILED
    assert [s["attempt"] for s in calls.of("pay")] == [1, 2, 3]
    assert calls.of("unbook") == [{"result": "booked"}]

    c = await check(app, handle.id)
    assert c.steps(Kind.STEP_RETRYING, Kind.STEP_FAILED) == [
        (Kind.STEP_RETRYING, "pay", 1),
        (Kind.STEP_RETRYING, "pay", 2),
        (Kind.STEP_FAILED, "pay", 3),
    ]
    (comp,) = c.of(Kind.SAGA_COMPENSATING)
    assert comp.error is not None
    assert comp.error["type"] == "StepFailed"
    assert "after 3 attempts" in comp.error["message"]
    assert c.kinds()[-3:] == [
        Kind.COMPENSATION_STARTED,
        Kind.COMPENSATION_COMPLETED,
        Kind.SAGA_FAILED,
    ]


class Declined(Exception):
    """A business error that retrying cannot fix."""


@pytest.mark.parametrize(
    ("policy", "exc"),
    [
        pytest.param(
            RetryPolicy(max_attempts=5, initial_interval=FAST, non_retryable=(Declined,)),
            Declined("card declined"),
            id="non_retryable",
        ),
        pytest.param(
            RetryPolicy(max_attempts=5, initial_interval=FAST, retry_on=(ConnectionError,)),
            KeyError("no such account"),
            id="not-in-retry_on",
        ),
        pytest.param(
            RetryPolicy(
                max_attempts=5,
                initial_interval=FAST,
                retry_on=(OSError,),
                non_retryable=(PermissionError,),
            ),
            PermissionError("forbidden"),
            id="non_retryable-beats-retry_on",
        ),
    ],
)
async def test_non_retryable_error_fails_after_one_attempt(
    app: App, calls: Any, check: Any, policy: RetryPolicy, exc: Exception
) -> None:
    async def first(ctx: Any, data: Any) -> int:
        return 1

    async def undo_first(ctx: Any, data: Any, result: Any) -> None:
        calls.add("undo_first", result=result)

    async def pay(ctx: Any, data: Any) -> None:
        calls.add("pay", attempt=ctx.attempt)
        raise exc

    app.register(
        Saga(
            "NoRetry",
            steps=[step("first", first, compensate=undo_first), step("pay", pay, retry=policy)],
        )
    )
    handle = await app.start("NoRetry")
    with pytest.raises(SagaFailed):
        await handle.result(timeout=5)

    assert calls.of("pay") == [{"attempt": 1}]
    assert calls.of("undo_first") == [{"result": 1}]
    c = await check(app, handle.id)
    assert c.info.state is SagaState.FAILED
    assert c.of(Kind.STEP_RETRYING) == []
    (failed,) = c.of(Kind.STEP_FAILED)
    assert failed.attempt == 1
    assert failed.error is not None
    assert failed.error["type"] == type(exc).__qualname__
    (comp,) = c.of(Kind.SAGA_COMPENSATING)
    assert comp.error is not None
    assert "after 1 attempt:" in comp.error["message"]


# -- 3. timeouts -------------------------------------------------------------------------------


async def test_async_step_timeout_is_a_failed_attempt_then_compensates(
    app: App, calls: Any, check: Any
) -> None:
    async def first(ctx: Any, data: Any) -> str:
        return "first"

    async def undo_first(ctx: Any, data: Any, result: Any) -> None:
        calls.add("undo_first", result=result)

    async def slow(ctx: Any, data: Any) -> None:
        calls.add("slow", attempt=ctx.attempt)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            calls.add("slow_cancelled", attempt=ctx.attempt)
            raise

    policy = RetryPolicy(max_attempts=2, initial_interval=FAST)
    app.register(
        Saga(
            "Timeout",
            steps=[
                step("first", first, compensate=undo_first),
                step("slow", slow, retry=policy, timeout=0.05),
            ],
        )
    )
    started = time.monotonic()
    handle = await app.start("Timeout")
    with pytest.raises(SagaFailed):
        await handle.result(timeout=5)
    assert time.monotonic() - started < 1.5

    assert calls.names() == ["slow", "slow_cancelled", "slow", "slow_cancelled", "undo_first"]
    c = await check(app, handle.id)
    assert c.info.state is SagaState.FAILED
    assert c.steps(Kind.STEP_RETRYING, Kind.STEP_FAILED) == [
        (Kind.STEP_RETRYING, "slow", 1),
        (Kind.STEP_FAILED, "slow", 2),
    ]
    retrying, failed = c.of(Kind.STEP_RETRYING, Kind.STEP_FAILED)
    assert retrying.error is not None
    assert retrying.error["type"] == "StepTimedOut"
    assert (
        "timed out after 0.05 s; it will be retried (attempt 1 of 2)" in (retrying.error["message"])
    )
    assert failed.error is not None
    assert failed.error["type"] == "StepTimedOut"
    assert "no attempts are left (attempt 2 of 2)" in failed.error["message"]
    assert [e.step for e in c.of(Kind.COMPENSATION_COMPLETED)] == ["first"]


async def test_timed_out_attempt_is_retried_and_can_succeed(
    app: App, calls: Any, check: Any
) -> None:
    async def sometimes_slow(ctx: Any, data: Any) -> str:
        calls.add("step", attempt=ctx.attempt)
        if ctx.attempt == 1:
            await asyncio.sleep(5)
        return "fast enough"

    policy = RetryPolicy(max_attempts=3, initial_interval=FAST)
    app.register(Saga("SlowOnce", steps=[step("s", sometimes_slow, retry=policy, timeout=0.05)]))
    handle = await app.start("SlowOnce")
    assert await handle.result(timeout=5) == {"s": "fast enough"}
    c = await check(app, handle.id)
    assert c.steps(Kind.STEP_RETRYING, Kind.STEP_COMPLETED) == [
        (Kind.STEP_RETRYING, "s", 1),
        (Kind.STEP_COMPLETED, "s", 2),
    ]
    assert c.of(Kind.STEP_RETRYING)[0].error["type"] == "StepTimedOut"  # type: ignore[index]


async def test_sync_step_in_thread_pool_times_out(app: App, calls: Any, check: Any) -> None:
    release = threading.Event()
    loop_thread = threading.current_thread()

    def first(ctx: Any, data: Any) -> str:
        return "first"

    def undo_first(ctx: Any, data: Any, result: Any) -> None:
        calls.add("undo_first", result=result, thread=threading.current_thread())

    def blocking(ctx: Any, data: Any) -> str:
        calls.add("blocking", attempt=ctx.attempt, thread=threading.current_thread())
        release.wait(5)
        return "too late"

    app.register(
        Saga(
            "SyncTimeout",
            steps=[
                step("first", first, compensate=undo_first),
                step("blocking", blocking, timeout=0.05),
            ],
        )
    )
    try:
        started = time.monotonic()
        handle = await app.start("SyncTimeout")
        with pytest.raises(SagaFailed):
            await handle.result(timeout=5)
        assert time.monotonic() - started < 1.5, "the timeout did not stop waiting for the thread"
    finally:
        release.set()

    (seen,) = calls.of("blocking")
    assert seen["thread"] is not loop_thread
    assert calls.of("undo_first")[0]["result"] == "first"
    c = await check(app, handle.id)
    assert c.info.state is SagaState.FAILED
    (failed,) = c.of(Kind.STEP_FAILED)
    assert (failed.step, failed.attempt) == ("blocking", 1)
    assert failed.error is not None
    assert failed.error["type"] == "StepTimedOut"
    assert c.of(Kind.STEP_COMPLETED)[-1].step == "first", "the late result is never recorded"


async def test_step_raising_its_own_timeout_error_is_not_a_step_timeout(
    app: App, check: Any
) -> None:
    async def upstream(ctx: Any, data: Any) -> None:
        raise TimeoutError("upstream gateway timed out")

    app.register(Saga("OwnTimeout", steps=[step("call", upstream, timeout=5)]))
    handle = await app.start("OwnTimeout")
    with pytest.raises(SagaFailed):
        await handle.result(timeout=5)
    c = await check(app, handle.id)
    (failed,) = c.of(Kind.STEP_FAILED)
    assert failed.error is not None
    assert failed.error["type"] == "TimeoutError"
    assert failed.error["message"] == "upstream gateway timed out"


# -- 4. saga deadline --------------------------------------------------------------------------


def deadline_steps(calls: Any) -> list[Any]:
    async def quick(ctx: Any, data: Any) -> str:
        calls.add("quick")
        return "q"

    async def slow(ctx: Any, data: Any) -> str:
        calls.add("slow")
        await asyncio.sleep(0.3)
        return "s"

    async def never(ctx: Any, data: Any) -> str:
        calls.add("never")
        return "n"

    async def undo(ctx: Any, data: Any, result: Any) -> None:
        calls.add(f"undo_{ctx.step}", result=result)

    return [
        step("quick", quick, compensate=undo),
        step("slow", slow, compensate=undo),
        step("never", never, compensate=undo),
    ]


async def assert_deadline_hit(app: App, check: Any, calls: Any, saga_id: str) -> None:
    with pytest.raises(SagaFailed) as raised:
        await app.handle(saga_id).result(timeout=5)
    assert raised.value.state is SagaState.FAILED
    assert calls.names() == ["quick", "slow", "undo_slow", "undo_quick"]
    assert calls.of("undo_slow") == [{"result": "s"}]
    c = await check(app, saga_id)
    assert c.info.state is SagaState.FAILED
    assert [e.step for e in c.of(Kind.STEP_STARTED)] == ["quick", "slow"], "3rd step started"
    (comp,) = c.of(Kind.SAGA_COMPENSATING)
    assert comp.error is not None
    assert comp.error["type"] == "SagaDeadlineExceeded"
    assert "'never'" in comp.error["message"]
    assert [e.step for e in c.of(Kind.COMPENSATION_COMPLETED)] == ["slow", "quick"]
    assert c.info.error == comp.error


async def test_saga_deadline_stops_before_next_step_and_compensates(
    app: App, calls: Any, check: Any
) -> None:
    app.register(Saga("Deadline", steps=deadline_steps(calls), deadline=0.2))
    handle = await app.start("Deadline")
    info = await handle.status()
    assert info.deadline is not None
    assert abs((info.deadline - info.created_at).total_seconds() - 0.2) < 0.01
    await assert_deadline_hit(app, check, calls, handle.id)


async def test_start_deadline_overrides_definition(app: App, calls: Any, check: Any) -> None:
    app.register(Saga("NoDeadline", steps=deadline_steps(calls)))
    handle = await app.start("NoDeadline", deadline=0.2)
    await assert_deadline_hit(app, check, calls, handle.id)


async def test_start_deadline_can_extend_the_definitions(app: App, calls: Any, check: Any) -> None:
    app.register(Saga("Tight", steps=deadline_steps(calls), deadline=0.2))
    handle = await app.start("Tight", deadline=30)
    assert await handle.result(timeout=5) == {"quick": "q", "slow": "s", "never": "n"}
    c = await check(app, handle.id)
    assert c.info.state is SagaState.COMPLETED
    assert c.info.deadline is not None
    assert (c.info.deadline - c.info.created_at).total_seconds() == pytest.approx(30, abs=0.01)


# -- 7. sync and async functions in one saga ---------------------------------------------------


@pytest.mark.parametrize("fail", [False, True], ids=["completes", "compensates"])
async def test_sync_and_async_steps_and_compensations_mixed(
    app: App, calls: Any, check: Any, fail: bool
) -> None:
    loop_thread = threading.current_thread()

    def sync_action(ctx: Any, data: Any) -> dict[str, Any]:
        calls.add(ctx.step, thread=threading.current_thread(), attempt=ctx.attempt)
        time.sleep(0.001)  # really blocking: must not run on the loop
        return {"step": ctx.step, "x": data["x"]}

    async def async_action(ctx: Any, data: Any) -> dict[str, Any]:
        calls.add(ctx.step, thread=threading.current_thread(), attempt=ctx.attempt)
        await asyncio.sleep(0)
        if fail and ctx.step == "d":
            raise RuntimeError("d failed")
        return {"step": ctx.step, "x": data["x"]}

    def sync_undo(ctx: Any, data: Any, result: Any) -> None:
        calls.add(f"undo_{ctx.step}", thread=threading.current_thread(), result=result)

    async def async_undo(ctx: Any, data: Any, result: Any) -> None:
        calls.add(f"undo_{ctx.step}", thread=threading.current_thread(), result=result)

    app.register(
        Saga(
            "Mixed",
            steps=[
                step("a", sync_action, compensate=async_undo),
                step("b", async_action, compensate=sync_undo),
                step("c", sync_action, compensate=sync_undo),
                step("d", async_action, compensate=async_undo),
            ],
        )
    )
    handle = await app.start("Mixed", {"x": 7})
    if fail:
        with pytest.raises(SagaFailed):
            await handle.result(timeout=5)
        assert calls.names() == ["a", "b", "c", "d", "undo_c", "undo_b", "undo_a"]
    else:
        out = await handle.result(timeout=5)
        assert out == {s: {"step": s, "x": 7} for s in "abcd"}
        assert calls.names() == ["a", "b", "c", "d"]

    sync_fns = {"a", "c", "undo_b", "undo_c"}
    for name, seen in calls.calls:
        if name in sync_fns:
            assert seen["thread"] is not loop_thread, f"{name} ran on the event loop thread"
            assert seen["thread"].name.startswith("sagakit-step")
        else:
            assert seen["thread"] is loop_thread, f"{name} did not run on the event loop"
        if name.startswith("undo_"):
            assert seen["result"] == {"step": name[5:], "x": 7}

    c = await check(app, handle.id)
    assert c.info.state is (SagaState.FAILED if fail else SagaState.COMPLETED)
    if fail:
        assert [e.step for e in c.of(Kind.COMPENSATION_COMPLETED)] == ["c", "b", "a"]
