"""Compensations that keep failing: needs_attention, then an operator's retry or resolve."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sagakit import (
    App,
    InvalidSagaState,
    Kind,
    RetryPolicy,
    Saga,
    SagaFailed,
    SagakitError,
    SagaNotFound,
    SagaState,
    step,
)

FAST = 0.001


def broken_compensation_saga(calls: Any, broken: dict[str, bool]) -> Saga:
    """a, b, c complete; d fails. c's compensation works, b's fails while ``broken``."""

    async def action(ctx: Any, data: Any) -> str:
        calls.add(ctx.step)
        if ctx.step == "d":
            raise RuntimeError("d is down")
        return f"{ctx.step}-done"

    async def undo(ctx: Any, data: Any, result: Any) -> None:
        calls.add(f"undo_{ctx.step}", attempt=ctx.attempt, result=result, data=data)
        if ctx.step == "b" and broken["b"]:
            raise ConnectionError("refund service unavailable")

    policy = RetryPolicy(max_attempts=2, initial_interval=FAST)
    return Saga(
        "Broken",
        steps=[step(n, action, compensate=undo, compensate_retry=policy) for n in "abcd"],
    )


async def park(app: App, calls: Any, data: Any = None) -> str:
    """Start a Broken saga and wait until it needs attention."""
    handle = await app.start("Broken", data)
    with pytest.raises(SagaFailed) as raised:
        await handle.result(timeout=5)
    assert raised.value.state is SagaState.NEEDS_ATTENTION
    return handle.id


async def test_exhausted_compensation_needs_attention_then_retry_finishes(
    app: App, calls: Any, check: Any
) -> None:
    broken = {"b": True}
    app.register(broken_compensation_saga(calls, broken))
    saga_id = await park(app, calls, {"order": 9})

    assert calls.names() == ["a", "b", "c", "d", "undo_c", "undo_b", "undo_b"]
    assert [s["attempt"] for s in calls.of("undo_b")] == [1, 2]
    c = await check(app, saga_id)
    assert c.info.state is SagaState.NEEDS_ATTENTION
    after_failure = c.kinds()[c.kinds().index(Kind.SAGA_COMPENSATING) + 1 :]
    assert after_failure == [
        Kind.COMPENSATION_STARTED,
        Kind.COMPENSATION_COMPLETED,
        Kind.COMPENSATION_STARTED,
        Kind.COMPENSATION_RETRYING,
        Kind.COMPENSATION_STARTED,
        Kind.COMPENSATION_EXHAUSTED,
    ]
    (exhausted,) = c.of(Kind.COMPENSATION_EXHAUSTED)
    assert (exhausted.step, exhausted.attempt) == ("b", 2)
    assert exhausted.data == {"owed": ["b", "a"]}
    assert exhausted.error is not None
    assert exhausted.error["type"] == "ConnectionError"
    assert c.info.error == exhausted.error
    assert [o.step for o in c.projection.owed()] == ["b", "a"]
    assert await app.list(state="needs_attention") == [c.info]

    # The operator fixes the refund service and retries.
    broken["b"] = False
    before = len(calls.calls)
    handle = await app.retry(saga_id)
    assert handle.id == saga_id
    with pytest.raises(SagaFailed) as raised:
        await handle.result(timeout=5)
    assert raised.value.state is SagaState.FAILED

    rerun = calls.calls[before:]
    assert [n for n, _ in rerun] == ["undo_b", "undo_a"], "each owed compensation, once, in order"
    assert rerun[0][1] == {"attempt": 1, "result": "b-done", "data": {"order": 9}}
    assert rerun[1][1] == {"attempt": 1, "result": "a-done", "data": {"order": 9}}
    assert calls.names().count("undo_c") == 1, "a finished compensation is not run again"
    assert [n for n in calls.names() if n in "abcd"] == ["a", "b", "c", "d"], "no step re-ran"

    c2 = await check(app, saga_id)
    assert c2.info.state is SagaState.FAILED
    tail = c2.entries[len(c.entries) :]
    assert [(e.kind, e.step, e.attempt) for e in tail] == [
        (Kind.OPERATOR_RETRY, None, None),
        (Kind.COMPENSATION_STARTED, "b", 1),
        (Kind.COMPENSATION_COMPLETED, "b", 1),
        (Kind.COMPENSATION_STARTED, "a", 1),
        (Kind.COMPENSATION_COMPLETED, "a", 1),
        (Kind.SAGA_FAILED, None, None),
    ]
    assert tail[0].data == {"resume": "compensating"}
    assert c2.projection.owed() == []
    assert [e.step for e in c2.of(Kind.COMPENSATION_COMPLETED)] == ["c", "b", "a"]


async def test_retry_that_fails_again_returns_to_needs_attention(
    app: App, calls: Any, check: Any
) -> None:
    app.register(broken_compensation_saga(calls, {"b": True}))
    saga_id = await park(app, calls)
    handle = await app.retry(saga_id)
    with pytest.raises(SagaFailed) as raised:
        await handle.result(timeout=5)
    assert raised.value.state is SagaState.NEEDS_ATTENTION
    assert [s["attempt"] for s in calls.of("undo_b")] == [1, 2, 1, 2]
    assert calls.of("undo_a") == []
    c = await check(app, saga_id)
    assert c.info.state is SagaState.NEEDS_ATTENTION
    assert [e.data for e in c.of(Kind.COMPENSATION_EXHAUSTED)] == [{"owed": ["b", "a"]}] * 2


async def test_resolve_marks_failed_with_the_note(app: App, calls: Any, check: Any) -> None:
    app.register(broken_compensation_saga(calls, {"b": True}))
    saga_id = await park(app, calls)
    before = len(calls.calls)

    info = await app.resolve(saga_id, note="refunded by hand, ticket OPS-42")
    assert info.state is SagaState.FAILED
    assert len(calls.calls) == before, "resolving runs nothing"
    c = await check(app, saga_id)
    assert c.info == info
    last = c.entries[-1]
    assert last.kind is Kind.OPERATOR_RESOLVED
    assert last.data == {"note": "refunded by hand, ticket OPS-42"}
    with pytest.raises(SagaFailed) as raised:
        await app.handle(saga_id).result(timeout=5)
    assert raised.value.state is SagaState.FAILED

    with pytest.raises(InvalidSagaState) as again:
        await app.resolve(saga_id, note="twice")
    assert again.value.state == "failed"
    with pytest.raises(InvalidSagaState):
        await app.retry(saga_id)


async def test_retry_and_resolve_need_a_saga_that_needs_attention(app: App, check: Any) -> None:
    async def ok(ctx: Any, data: Any) -> int:
        return 1

    app.register(Saga("Fine", steps=[step("ok", ok)]))
    handle = await app.start("Fine")
    await handle.result(timeout=5)
    before = await check(app, handle.id)

    with pytest.raises(InvalidSagaState) as raised:
        await app.retry(handle.id)
    assert raised.value.state == "completed"
    assert raised.value.action == "retry"
    assert "needs_attention" in str(raised.value)
    with pytest.raises(InvalidSagaState) as raised:
        await app.resolve(handle.id, note="n/a")
    assert raised.value.action == "resolve"
    after = await check(app, handle.id)
    assert after.entries == before.entries, "a refused operator action writes nothing"

    for action in (app.retry("no-such-id"), app.resolve("no-such-id", note="x")):
        with pytest.raises(SagaNotFound) as missing:
            await action
        assert missing.value.saga_id == "no-such-id"


async def test_concurrent_retries_resume_the_saga_once(app: App, calls: Any, check: Any) -> None:
    """Two operators press retry at once: one resumes the saga, the other is told it is no
    longer in needs_attention (not a raw database error), and compensations run once."""
    broken = {"b": True}
    app.register(broken_compensation_saga(calls, broken))
    saga_id = await park(app, calls)
    broken["b"] = False
    before = len(calls.calls)

    outcomes = await asyncio.gather(app.retry(saga_id), app.retry(saga_id), return_exceptions=True)
    handles = [o for o in outcomes if not isinstance(o, BaseException)]
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(handles) == 1
    with pytest.raises(SagaFailed):
        await handles[0].result(timeout=5)
    assert [n for n, _ in calls.calls[before:]] == ["undo_b", "undo_a"]
    c = await check(app, saga_id)
    assert c.info.state is SagaState.FAILED
    assert len(c.of(Kind.OPERATOR_RETRY)) == 1
    assert [type(e) for e in errors] == [InvalidSagaState], errors


async def test_resolve_with_a_note_that_is_not_json_is_refused_cleanly(
    app: App, calls: Any, check: Any
) -> None:
    """A bad note is bad input: a SagakitError before anything is written, not a raw
    TypeError from the database writer thread."""
    app.register(broken_compensation_saga(calls, {"b": True}))
    saga_id = await park(app, calls)
    before = await check(app, saga_id)

    with pytest.raises(SagakitError):
        await app.resolve(saga_id, note={"by": object()})  # type: ignore[arg-type]
    after = await check(app, saga_id)
    assert after.entries == before.entries
    assert after.info.state is SagaState.NEEDS_ATTENTION
    info = await app.resolve(saga_id, note="fixed by hand")
    assert info.state is SagaState.FAILED
