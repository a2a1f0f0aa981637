"""Recovery in-process: an App closed mid-saga, a new App on the same file finishes it from the
journal. Also definitions that changed (non-determinism) or vanished under a running saga."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from sagakit import (
    App,
    Kind,
    PayloadError,
    Saga,
    SagaFailed,
    SagakitError,
    SagaState,
    WorkflowContext,
    step,
)

# Step bodies count their calls here, so a count survives the App that ran them.
CALLS: Counter[str] = Counter()
SEEN: dict[str, list[Any]] = {}
GATES: dict[str, asyncio.Event] = {}


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    SEEN.clear()
    GATES.clear()


def note(name: str, value: Any = None) -> None:
    CALLS[name] += 1
    SEEN.setdefault(name, []).append(value)


async def gate(name: str) -> None:
    """Block until the test opens the gate ``name`` (if the test set one up)."""
    g = GATES.get(name)
    if g is not None:
        await g.wait()


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


# -- declarative definitions, rebuilt identically for each App ---------------------------------


async def reserve(ctx: Any, data: Any) -> str:
    note("reserve", ctx.attempt)
    return f"r-{data['n']}"


async def charge(ctx: Any, data: Any) -> str:
    note("charge", (ctx.attempt, ctx.idempotency_key))
    await gate("charge")
    return f"c-{data['n']}"


async def ship(ctx: Any, data: Any) -> str:
    note("ship", ctx.attempt)
    if data.get("fail_ship"):
        raise RuntimeError("no trucks")
    return f"s-{data['n']}"


async def unreserve(ctx: Any, data: Any, result: Any) -> None:
    note("unreserve", (ctx.attempt, result))
    await gate("unreserve")


async def refund(ctx: Any, data: Any, result: Any) -> None:
    note("refund", (ctx.attempt, result))


def order_saga() -> Saga:
    return Saga(
        "Order",
        steps=[
            step("reserve", reserve, compensate=unreserve),
            step("charge", charge, compensate=refund),
            step("ship", ship),
        ],
    )


def new_app(db_url: str, *sagas: Saga) -> App:
    app = App(db_url, poll_interval=0.02)
    for s in sagas:
        app.register(s)
    return app


async def read_closed(db_url: str, saga_id: str, check: Any) -> Any:
    """The saga as a closed App left it on disk, read by an App that executes nothing."""
    reader = App(db_url, worker=False)
    try:
        return await check(reader, saga_id)
    finally:
        await reader.close()


async def test_app_closed_mid_step_resumes_in_a_new_app(db_url: str, check: Any) -> None:
    GATES["charge"] = asyncio.Event()
    first = new_app(db_url, order_saga())
    try:
        handle = await first.start("Order", {"n": 1})
        await eventually(lambda: CALLS["charge"] == 1)
    finally:
        await first.close()  # cancels the saga blocked in charge
    before = await read_closed(db_url, handle.id, check)
    assert before.info.state is SagaState.RUNNING
    assert before.steps(Kind.STEP_STARTED, Kind.STEP_COMPLETED)[-1] == (
        Kind.STEP_STARTED,
        "charge",
        1,
    )
    assert [e.step for e in before.of(Kind.STEP_COMPLETED)] == ["reserve"]

    GATES["charge"].set()
    second = new_app(db_url, order_saga())
    try:
        assert await second.handle(handle.id).result(timeout=5) == {
            "reserve": "r-1",
            "charge": "c-1",
            "ship": "s-1",
        }
        assert dict(CALLS) == {"reserve": 1, "charge": 2, "ship": 1}, (
            "only the interrupted step re-ran"
        )
        key = f"{handle.id}/charge"
        assert SEEN["charge"] == [(1, key), (1, key)], "a re-run is the same attempt, same key"

        c = await check(second, handle.id)
        assert c.info.state is SagaState.COMPLETED
        assert c.steps(Kind.STEP_STARTED, Kind.STEP_COMPLETED) == [
            (Kind.STEP_STARTED, "reserve", 1),
            (Kind.STEP_COMPLETED, "reserve", 1),
            (Kind.STEP_STARTED, "charge", 1),
            (Kind.STEP_STARTED, "charge", 1),
            (Kind.STEP_COMPLETED, "charge", 1),
            (Kind.STEP_STARTED, "ship", 1),
            (Kind.STEP_COMPLETED, "ship", 1),
        ]
        assert c.entries[: len(before.entries)] == before.entries, "the journal is append-only"
        assert c.projection.reruns == 1
        assert len(c.of(Kind.SAGA_COMPLETED)) == 1
    finally:
        await second.close()


async def test_app_closed_mid_compensation_finishes_compensating(db_url: str, check: Any) -> None:
    GATES["unreserve"] = asyncio.Event()
    first = new_app(db_url, order_saga())
    try:
        handle = await first.start("Order", {"n": 2, "fail_ship": True})
        await eventually(lambda: CALLS["unreserve"] == 1)
    finally:
        await first.close()
    before = await read_closed(db_url, handle.id, check)
    assert before.info.state is SagaState.COMPENSATING
    assert [e.step for e in before.of(Kind.COMPENSATION_COMPLETED)] == ["charge"]
    assert before.steps(Kind.COMPENSATION_STARTED)[-1] == (
        Kind.COMPENSATION_STARTED,
        "reserve",
        1,
    ), "a compensation is recorded before it runs"

    GATES["unreserve"].set()
    second = new_app(db_url, order_saga())
    try:
        with pytest.raises(SagaFailed) as raised:
            await second.handle(handle.id).result(timeout=5)
        assert raised.value.state is SagaState.FAILED
        assert dict(CALLS) == {"reserve": 1, "charge": 1, "ship": 1, "refund": 1, "unreserve": 2}, (
            "no step re-ran, the finished refund was not repeated"
        )
        assert SEEN["refund"] == [(1, "c-2")]
        assert SEEN["unreserve"] == [(1, "r-2"), (2, "r-2")]

        c = await check(second, handle.id)
        assert c.info.state is SagaState.FAILED
        assert c.entries[: len(before.entries)] == before.entries
        tail = c.entries[len(before.entries) :]
        assert [(e.kind, e.step, e.attempt) for e in tail] == [
            (Kind.COMPENSATION_STARTED, "reserve", 2),
            (Kind.COMPENSATION_COMPLETED, "reserve", 2),
            (Kind.SAGA_FAILED, None, None),
        ]
        assert len(c.of(Kind.SAGA_COMPENSATING)) == 1
    finally:
        await second.close()


# -- code-first: recorded values, non-determinism, unknown types -------------------------------


async def alpha(ctx: Any, data: Any) -> str:
    note("alpha", data)
    return "a"


async def blocker(ctx: Any, data: Any) -> str:
    note("blocker", data)
    await gate("blocker")
    return f"b:{data}"


async def beta(ctx: Any, data: Any) -> str:
    note("beta", data)
    return "beta"


async def original_flow(ctx: WorkflowContext, data: Any) -> dict[str, Any]:
    ref = ctx.uuid()
    a = await ctx.step(alpha, data)
    b = await ctx.step(blocker, str(ref))
    return {"a": a, "b": b, "ref": str(ref)}


async def changed_flow(ctx: WorkflowContext, data: Any) -> dict[str, Any]:
    ref = ctx.uuid()
    first = await ctx.step(beta, data)  # was alpha
    return {"first": first, "ref": str(ref)}


async def start_blocked_flow(db_url: str, check: Any) -> tuple[str, Any]:
    """Start Flow (original code), leave it blocked in its 2nd step, close the App."""
    GATES["blocker"] = asyncio.Event()
    first = new_app(db_url, Saga("Flow", workflow=original_flow))
    try:
        handle = await first.start("Flow", "in")
        await eventually(lambda: CALLS["blocker"] == 1)
    finally:
        await first.close()
    GATES["blocker"].set()
    before = await read_closed(db_url, handle.id, check)
    assert before.info.state is SagaState.RUNNING
    assert before.kinds()[-1] is Kind.STEP_STARTED
    return handle.id, before


async def test_recorded_values_are_replayed_after_recovery(db_url: str, check: Any) -> None:
    saga_id, before = await start_blocked_flow(db_url, check)
    (recorded,) = before.of(Kind.VALUE_RECORDED)
    ref = recorded.data["value"]

    second = new_app(db_url, Saga("Flow", workflow=original_flow))
    try:
        out = await second.handle(saga_id).result(timeout=5)
        assert out == {"a": "a", "b": f"b:{ref}", "ref": ref}
        assert SEEN["blocker"] == [ref, ref], "the replay saw the recorded uuid"
        assert CALLS["alpha"] == 1
        c = await check(second, saga_id)
        assert len(c.of(Kind.VALUE_RECORDED)) == 1
        assert c.info.state is SagaState.COMPLETED
    finally:
        await second.close()


async def test_changed_workflow_parks_the_saga_for_an_operator(db_url: str, check: Any) -> None:
    saga_id, before = await start_blocked_flow(db_url, check)

    changed = new_app(db_url, Saga("Flow", workflow=changed_flow))
    try:
        with pytest.raises(SagaFailed) as raised:
            await changed.handle(saga_id).result(timeout=5)
        assert raised.value.state is SagaState.NEEDS_ATTENTION
        assert CALLS["beta"] == 0, "a replay that disagrees with the journal runs nothing"
        c = await check(changed, saga_id)
        assert c.info.state is SagaState.NEEDS_ATTENTION
        tail = c.entries[len(before.entries) :]
        assert [e.kind for e in tail] == [Kind.SAGA_PARKED]
        err = tail[0].error
        assert err is not None
        assert err["type"] == "NonDeterminismError"
        assert "'alpha'" in err["message"]
        assert "'beta'" in err["message"]
        assert "Deploy the code the saga started with" in err["message"]
        assert "retry" in err["message"]
        assert c.of(Kind.SAGA_COMPENSATING) == [], "a non-deterministic saga is parked, not undone"
    finally:
        await changed.close()

    # The operator deploys the original code again and retries: the saga finishes.
    fixed = new_app(db_url, Saga("Flow", workflow=original_flow))
    try:
        assert (await fixed.get(saga_id)).state is SagaState.NEEDS_ATTENTION
        handle = await fixed.retry(saga_id)
        out = await handle.result(timeout=5)
        assert out["a"] == "a"
        assert out["b"] == f"b:{out['ref']}"
        assert CALLS["alpha"] == 1
        c = await check(fixed, saga_id)
        assert c.info.state is SagaState.COMPLETED
        assert (await fixed.journal(saga_id))[-1].kind is Kind.SAGA_COMPLETED
        (retry,) = c.of(Kind.OPERATOR_RETRY)
        assert retry.data == {"resume": "running"}
    finally:
        await fixed.close()


async def test_unregistered_type_parks_then_retry_after_registering(
    db_url: str, check: Any
) -> None:
    saga_id, before = await start_blocked_flow(db_url, check)

    bare = new_app(db_url)  # Flow is not registered in this process
    try:
        with pytest.raises(SagaFailed) as raised:
            await bare.handle(saga_id).result(timeout=5)
        assert raised.value.state is SagaState.NEEDS_ATTENTION
        c = await check(bare, saga_id)
        (parked,) = c.of(Kind.SAGA_PARKED)
        assert parked.error is not None
        assert "'Flow'" in parked.error["message"]
        assert "not registered" in parked.error["message"]
        assert "retry" in parked.error["message"]
        assert CALLS["blocker"] == 1

        bare.register(Saga("Flow", workflow=original_flow))
        handle = await bare.retry(saga_id)
        out = await handle.result(timeout=5)
        assert out["b"] == f"b:{out['ref']}"
        assert dict(CALLS) == {"alpha": 1, "blocker": 2}
        c = await check(bare, saga_id)
        assert c.info.state is SagaState.COMPLETED
        assert c.entries[: len(before.entries)] == before.entries
    finally:
        await bare.close()


async def changed_value_flow(ctx: WorkflowContext, data: Any) -> dict[str, Any]:
    when = ctx.now()  # was ctx.uuid()
    a = await ctx.step(alpha, data)
    return {"a": a, "when": when}


async def test_changed_recorded_value_parks_the_saga(db_url: str, check: Any) -> None:
    saga_id, before = await start_blocked_flow(db_url, check)
    changed = new_app(db_url, Saga("Flow", workflow=changed_value_flow))
    try:
        with pytest.raises(SagaFailed) as raised:
            await changed.handle(saga_id).result(timeout=5)
        assert raised.value.state is SagaState.NEEDS_ATTENTION
        c = await check(changed, saga_id)
        (parked,) = c.entries[len(before.entries) :]
        assert parked.kind is Kind.SAGA_PARKED
        assert parked.error is not None
        assert parked.error["type"] == "NonDeterminismError"
        assert "ctx.now()" in parked.error["message"]
        assert "ctx.uuid()" in parked.error["message"]
        assert CALLS["alpha"] == 1
    finally:
        await changed.close()


async def test_deadline_that_passed_while_closed_compensates_on_reopen(
    db_url: str, check: Any
) -> None:
    GATES["charge"] = asyncio.Event()
    first = new_app(db_url, order_saga())
    try:
        handle = await first.start("Order", {"n": 3}, deadline=0.2)
        await eventually(lambda: CALLS["charge"] == 1)
    finally:
        await first.close()
    GATES["charge"].set()
    await asyncio.sleep(0.25)  # the deadline passes while no process runs the saga

    second = new_app(db_url, order_saga())
    try:
        with pytest.raises(SagaFailed) as raised:
            await second.handle(handle.id).result(timeout=5)
        assert raised.value.state is SagaState.FAILED
        # charge never completed, so it is neither re-run nor compensated; reserve is undone.
        assert dict(CALLS) == {"reserve": 1, "charge": 1, "unreserve": 1}
        c = await check(second, handle.id)
        (comp,) = c.of(Kind.SAGA_COMPENSATING)
        assert comp.error is not None
        assert comp.error["type"] == "SagaDeadlineExceeded"
        assert [e.step for e in c.of(Kind.COMPENSATION_COMPLETED)] == ["reserve"]
    finally:
        await second.close()


async def test_corrupt_stored_input_parks_only_that_saga(db_url: str, check: Any) -> None:
    """A saga row whose input no longer decodes is moved to needs_attention with the reason;
    it is not retried in a loop, and the other sagas run normally (DESIGN principle 5)."""
    writer = App(db_url, worker=False)
    try:
        writer.register(order_saga())
        bad = await writer.start("Order", {"n": 4})
        good = await writer.start("Order", {"n": 5})
    finally:
        await writer.close()
    conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    with conn:
        conn.execute("UPDATE sagakit_sagas SET input = '{\"n\": ' WHERE id = ?", (bad.id,))
    conn.close()

    app = new_app(db_url, order_saga())
    try:
        assert await app.handle(good.id).result(timeout=5) == {
            "reserve": "r-5",
            "charge": "c-5",
            "ship": "s-5",
        }
        with pytest.raises(SagaFailed) as raised:
            await app.handle(bad.id).result(timeout=1)
        assert raised.value.state is SagaState.NEEDS_ATTENTION
        c = await check(app, bad.id)
        assert c.kinds()[-1] is Kind.SAGA_PARKED
        assert c.info.error is not None
        assert c.info.error["type"] == "CorruptPayload"
        assert CALLS["reserve"] == 1, "nothing of the corrupt saga ran"
    finally:
        await app.close()


@dataclass(frozen=True)
class Parcel:
    weight: int
    to: str


async def parcel_flow(ctx: WorkflowContext, data: Parcel) -> int:
    note("parcel", data)
    return data.weight


async def test_input_that_does_not_fit_the_workflows_type_is_refused_or_parked(
    db_url: str, check: Any
) -> None:
    """``data: Parcel`` but started with a dict missing its fields: either start() refuses it
    before writing anything, or the saga comes to rest where an operator sees it. It must not
    sit in ``started`` while the worker retries it forever."""
    app = new_app(db_url, Saga("Parcel", workflow=parcel_flow))
    try:
        try:
            handle = await app.start("Parcel", {"colour": "red"})
        except PayloadError:
            assert await app.list() == []
            return
        with pytest.raises(SagaFailed) as raised:
            await handle.result(timeout=1)
        assert raised.value.state in (SagaState.NEEDS_ATTENTION, SagaState.FAILED)
        c = await check(app, handle.id)
        assert c.info.error is not None
        assert CALLS["parcel"] == 0
    finally:
        await app.close()


async def test_result_waiter_is_not_cancelled_when_the_app_closes(db_url: str) -> None:
    """Closing the App stops its sagas; a task awaiting ``handle.result()`` was not itself
    cancelled, so it must get a SagakitError (or keep waiting), never a CancelledError that
    makes the caller's own task look cancelled."""
    GATES["charge"] = asyncio.Event()
    app = new_app(db_url, order_saga())
    try:
        handle = await app.start("Order", {"n": 6})
        await eventually(lambda: CALLS["charge"] == 1)
        waiter = asyncio.create_task(handle.result(timeout=2))
        await asyncio.sleep(0.01)
    finally:
        await app.close()
    done, _ = await asyncio.wait({waiter}, timeout=3)
    assert done, "result() kept waiting on a closed App"
    assert not waiter.cancelled(), "result() raised CancelledError into an uncancelled task"
    assert isinstance(waiter.exception(), SagakitError | TimeoutError)
    await app.close()
