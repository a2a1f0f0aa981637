"""The engine's key behaviours through ``App(url)``, on SQLite and on PostgreSQL alike.

The same sagas run on both backends (``any_url``): compensation order, retries, operator
retry of a saga that needs attention, idempotent starts, recovery in a new App, code-first
workflows with recorded values, non-determinism, and a client App handing work to an
executing one. On PostgreSQL the wake-ups must come from NOTIFY, so those Apps poll only
every 30 s. A PostgreSQL-only test at the end takes a saga over from a worker whose database
connection died, and fences that worker's late write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sagakit import (
    App,
    Kind,
    RetryPolicy,
    Saga,
    SagaFailed,
    SagaState,
    WorkflowContext,
    step,
)
from sagakit.codec import decode

FAST = 0.001
ORDER_STEPS = ("reserve", "charge", "ship", "confirm")
ORDER = {"order": "A-1", "items": [{"sku": "X", "qty": 2}]}
NOTIFY_ONLY = 30.0  # a poll interval no test waits for: only a wake-up can be in time


def is_pg(url: str) -> bool:
    return url.startswith("postgres")


async def eventually(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


class Apps:
    """Makes Apps on one URL; every one is closed after the test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.made: list[App] = []

    def new(self, *sagas: Saga, **kwargs: Any) -> App:
        kwargs.setdefault("poll_interval", 0.05)
        app = App(self.url, **kwargs)
        for s in sagas:
            app.register(s)
        self.made.append(app)
        return app


@pytest.fixture
async def apps(any_url: str) -> AsyncIterator[Apps]:
    made = Apps(any_url)
    try:
        yield made
    finally:
        for app in reversed(made.made):
            await app.close()


@pytest.fixture
async def pg_apps(pg_url: str) -> AsyncIterator[Apps]:
    made = Apps(pg_url)
    try:
        yield made
    finally:
        for app in reversed(made.made):
            await app.close()


async def recoveries(app: App, saga_id: str) -> int:
    record = await app.store.get(saga_id)
    assert record is not None
    return record.recoveries


# -- compensation order ------------------------------------------------------------------------


def order_saga(calls: Any, fail_at: str | None) -> Saga:
    def make(name: str) -> Any:
        async def action(ctx: Any, data: Any) -> dict[str, Any]:
            calls.add(name, key=ctx.idempotency_key, attempt=ctx.attempt)
            if name == fail_at:
                raise RuntimeError(f"{name} service is down")
            return {"done": name}

        def compensate(ctx: Any, data: Any, result: Any) -> None:  # sync: runs in the pool
            calls.add(f"undo_{name}", key=ctx.idempotency_key, result=result, data=data)

        return step(name, action, compensate=compensate)

    return Saga("Order", steps=[make(s) for s in ORDER_STEPS])


@pytest.mark.parametrize("fail_at", ORDER_STEPS)
async def test_failure_at_each_step_compensates_completed_steps_in_reverse(
    apps: Apps, calls: Any, check: Any, fail_at: str
) -> None:
    app = apps.new(order_saga(calls, fail_at))
    handle = await app.start("Order", ORDER)
    with pytest.raises(SagaFailed) as raised:
        await handle.result(timeout=5)
    assert raised.value.state is SagaState.FAILED

    completed = list(ORDER_STEPS[: ORDER_STEPS.index(fail_at)])
    undone = [f"undo_{s}" for s in reversed(completed)]
    assert calls.names() == [*completed, fail_at, *undone]
    for s in completed:
        (seen,) = calls.of(f"undo_{s}")
        assert seen == {"key": f"{handle.id}/{s}/compensate", "result": {"done": s}, "data": ORDER}

    c = await check(app, handle.id)
    assert c.info.state is SagaState.FAILED
    expected = [Kind.SAGA_STARTED]
    expected += [Kind.STEP_STARTED, Kind.STEP_COMPLETED] * len(completed)
    expected += [Kind.STEP_STARTED, Kind.STEP_FAILED, Kind.SAGA_COMPENSATING]
    expected += [Kind.COMPENSATION_STARTED, Kind.COMPENSATION_COMPLETED] * len(completed)
    expected += [Kind.SAGA_FAILED]
    assert c.kinds() == expected
    assert [e.step for e in c.of(Kind.COMPENSATION_COMPLETED)] == completed[::-1]
    (failed,) = c.of(Kind.STEP_FAILED)
    assert failed.error is not None
    assert failed.error["message"] == f"{fail_at} service is down"
    assert c.info.current_step == fail_at
    assert c.projection.owed() == []
    assert await recoveries(app, handle.id) == 0


async def test_no_failure_completes_without_compensation(
    apps: Apps, calls: Any, check: Any
) -> None:
    app = apps.new(order_saga(calls, None))
    handle = await app.start("Order", ORDER)
    assert await handle.result(timeout=5) == {s: {"done": s} for s in ORDER_STEPS}
    assert calls.names() == list(ORDER_STEPS)
    c = await check(app, handle.id)
    assert c.kinds() == [
        Kind.SAGA_STARTED,
        *[Kind.STEP_STARTED, Kind.STEP_COMPLETED] * 4,
        Kind.SAGA_COMPLETED,
    ]
    assert [i.id for i in await app.list(state="completed")] == [handle.id]


# -- retries -----------------------------------------------------------------------------------


async def test_step_fails_twice_then_succeeds(apps: Apps, calls: Any, check: Any) -> None:
    failures = {"left": 2}

    async def flaky(ctx: Any, data: Any) -> str:
        calls.add("flaky", attempt=ctx.attempt, key=ctx.idempotency_key)
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError(f"flaky attempt {ctx.attempt}")
        return "paid"

    policy = RetryPolicy(max_attempts=3, initial_interval=FAST, retry_on=(ConnectionError,))
    app = apps.new(Saga("Retry", steps=[step("pay", flaky, retry=policy)]))
    handle = await app.start("Retry", {"n": 1})
    assert await handle.result(timeout=5) == {"pay": "paid"}
    assert [s["attempt"] for s in calls.of("flaky")] == [1, 2, 3]
    assert {s["key"] for s in calls.of("flaky")} == {f"{handle.id}/pay"}

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
    assert [(e.error or {}).get("message") for e in c.of(Kind.STEP_RETRYING)] == [
        "flaky attempt 1",
        "flaky attempt 2",
    ]
    assert c.projection.reruns == 0
    assert c.of(Kind.SAGA_COMPENSATING) == []


# -- needs_attention and the operator's retry --------------------------------------------------


def broken_compensation_saga(calls: Any, broken: dict[str, bool]) -> Saga:
    """a, b, c complete; d fails. b's compensation fails while ``broken``."""

    async def action(ctx: Any, data: Any) -> str:
        calls.add(ctx.step)
        if ctx.step == "d":
            raise RuntimeError("d is down")
        return f"{ctx.step}-done"

    async def undo(ctx: Any, data: Any, result: Any) -> None:
        calls.add(f"undo_{ctx.step}", attempt=ctx.attempt, result=result)
        if ctx.step == "b" and broken["b"]:
            raise ConnectionError("refund service unavailable")

    policy = RetryPolicy(max_attempts=2, initial_interval=FAST)
    return Saga(
        "Broken",
        steps=[step(n, action, compensate=undo, compensate_retry=policy) for n in "abcd"],
    )


async def park(app: App) -> str:
    handle = await app.start("Broken", {"order": 9})
    with pytest.raises(SagaFailed) as raised:
        await handle.result(timeout=5)
    assert raised.value.state is SagaState.NEEDS_ATTENTION
    return handle.id


async def assert_retried_to_failed(
    app: App, check: Any, calls: Any, saga_id: str, *, before: int, parked_entries: int
) -> None:
    assert [n for n, _ in calls.calls[before:]] == ["undo_b", "undo_a"]
    assert calls.names().count("undo_c") == 1, "a finished compensation is not run again"
    assert [n for n in calls.names() if n in "abcd"] == ["a", "b", "c", "d"], "no step re-ran"
    c = await check(app, saga_id)
    assert c.info.state is SagaState.FAILED
    tail = c.entries[parked_entries:]
    assert [(e.kind, e.step, e.attempt) for e in tail] == [
        (Kind.OPERATOR_RETRY, None, None),
        (Kind.COMPENSATION_STARTED, "b", 1),
        (Kind.COMPENSATION_COMPLETED, "b", 1),
        (Kind.COMPENSATION_STARTED, "a", 1),
        (Kind.COMPENSATION_COMPLETED, "a", 1),
        (Kind.SAGA_FAILED, None, None),
    ]
    assert [e.step for e in c.of(Kind.COMPENSATION_COMPLETED)] == ["c", "b", "a"]
    assert c.projection.owed() == []
    assert await recoveries(app, saga_id) == 0, "a released saga is claimed, not recovered"


async def test_exhausted_compensation_needs_attention_then_retry_finishes(
    apps: Apps, calls: Any, check: Any
) -> None:
    broken = {"b": True}
    app = apps.new(broken_compensation_saga(calls, broken), poll_interval=NOTIFY_ONLY)
    saga_id = await park(app)
    assert calls.names() == ["a", "b", "c", "d", "undo_c", "undo_b", "undo_b"]
    parked = await check(app, saga_id)
    assert parked.info.state is SagaState.NEEDS_ATTENTION
    (exhausted,) = parked.of(Kind.COMPENSATION_EXHAUSTED)
    assert exhausted.data == {"owed": ["b", "a"]}
    assert [i.id for i in await app.list(state="needs_attention")] == [saga_id]

    broken["b"] = False
    before = len(calls.calls)
    started = time.monotonic()
    handle = await app.retry(saga_id)
    with pytest.raises(SagaFailed) as raised:
        await handle.result(timeout=5)
    assert raised.value.state is SagaState.FAILED
    assert time.monotonic() - started < 2, "the retry was picked up by a wake-up, not a poll"
    await assert_retried_to_failed(
        app, check, calls, saga_id, before=before, parked_entries=len(parked.entries)
    )


async def test_retry_by_a_client_app_is_run_by_the_executing_app(
    apps: Apps, calls: Any, check: Any
) -> None:
    """The retry releases the saga; the executing App claims it back (on PostgreSQL because
    NOTIFY woke it: it would not poll for another 30 s)."""
    broken = {"b": True}
    poll = NOTIFY_ONLY if is_pg(apps.url) else 0.05
    runner = apps.new(broken_compensation_saga(calls, broken), poll_interval=poll)
    saga_id = await park(runner)
    parked = await check(runner, saga_id)

    operator = apps.new(broken_compensation_saga(calls, broken), worker=False)
    broken["b"] = False
    before = len(calls.calls)
    started = time.monotonic()
    handle = await operator.retry(saga_id)
    assert not operator.executing
    with pytest.raises(SagaFailed) as raised:
        await handle.result(timeout=5)
    assert raised.value.state is SagaState.FAILED
    assert time.monotonic() - started < 2
    await assert_retried_to_failed(
        runner, check, calls, saga_id, before=before, parked_entries=len(parked.entries)
    )


# -- idempotent start --------------------------------------------------------------------------


def counting_saga(calls: Any) -> Saga:
    async def one(ctx: Any, data: Any) -> Any:
        calls.add("one", saga_id=ctx.saga_id)
        return data

    async def two(ctx: Any, data: Any) -> Any:
        calls.add("two", saga_id=ctx.saga_id)
        return data

    return Saga("Counted", steps=[step("one", one), step("two", two)])


async def test_fifty_concurrent_starts_with_one_key_make_one_saga(
    apps: Apps, calls: Any, check: Any
) -> None:
    app = apps.new(counting_saga(calls))
    handles = await asyncio.gather(
        *(app.start("Counted", {"n": i}, idempotency_key="k1") for i in range(50))
    )
    assert len({h.id for h in handles}) == 1
    created = [i for i, h in enumerate(handles) if h.created]
    assert len(created) == 1
    assert await handles[0].result(timeout=5) == {
        "one": {"n": created[0]},
        "two": {"n": created[0]},
    }
    (info,) = await app.list()
    assert (info.id, info.idempotency_key, info.input) == (handles[0].id, "k1", {"n": created[0]})
    assert calls.names() == ["one", "two"], "the steps ran once"
    c = await check(app, info.id)
    assert len(c.of(Kind.SAGA_STARTED)) == 1
    assert len(c.of(Kind.SAGA_COMPLETED)) == 1

    again = await app.start("Counted", {"n": "late"}, idempotency_key="k1")
    assert (again.id, again.created) == (info.id, False)
    assert calls.names() == ["one", "two"]


# -- a client App and an executing App on one database -----------------------------------------


async def test_a_client_app_starts_a_saga_that_the_executing_app_runs(
    apps: Apps, calls: Any, check: Any
) -> None:
    poll = NOTIFY_ONLY if is_pg(apps.url) else 0.05
    runner = apps.new(counting_saga(calls), poll_interval=poll)
    await runner.open()
    assert runner.executing
    client = apps.new(counting_saga(calls), worker=False)

    started = time.monotonic()
    handle = await client.start("Counted", {"from": "client"})
    assert handle.created
    assert not client.executing
    assert await handle.result(timeout=5) == {"one": {"from": "client"}, "two": {"from": "client"}}
    assert time.monotonic() - started < 2, "the runner was woken, it did not wait for its poll"
    assert [s["saga_id"] for s in calls.of("one")] == [handle.id]
    c = await check(client, handle.id)
    assert c.info.state is SagaState.COMPLETED
    assert await recoveries(runner, handle.id) == 0
    assert (await runner.get(handle.id)).state is SagaState.COMPLETED


# -- recovery in a new App ---------------------------------------------------------------------


def gated_order_saga(calls: Any, gate: asyncio.Event) -> Saga:
    async def reserve(ctx: Any, data: Any) -> str:
        calls.add("reserve", attempt=ctx.attempt)
        return f"r-{data['n']}"

    async def charge(ctx: Any, data: Any) -> str:
        calls.add("charge", attempt=ctx.attempt, key=ctx.idempotency_key)
        await gate.wait()
        return f"c-{data['n']}"

    async def ship(ctx: Any, data: Any) -> str:
        calls.add("ship", attempt=ctx.attempt)
        return f"s-{data['n']}"

    async def unreserve(ctx: Any, data: Any, result: Any) -> None:
        calls.add("unreserve")

    return Saga(
        "Gated",
        steps=[
            step("reserve", reserve, compensate=unreserve),
            step("charge", charge),
            step("ship", ship),
        ],
    )


async def test_app_closed_mid_step_resumes_in_a_new_app(apps: Apps, calls: Any, check: Any) -> None:
    gate = asyncio.Event()
    first = apps.new(gated_order_saga(calls, gate))
    handle = await first.start("Gated", {"n": 1})
    await eventually(lambda: calls.names().count("charge") == 1)
    await first.close()  # cancels the saga blocked in charge

    reader = apps.new(worker=False)
    before = await check(reader, handle.id)
    assert before.info.state is SagaState.RUNNING
    assert [e.step for e in before.of(Kind.STEP_COMPLETED)] == ["reserve"]
    assert before.kinds()[-1] is Kind.STEP_STARTED

    gate.set()
    second = apps.new(gated_order_saga(calls, gate))
    out = await second.handle(handle.id).result(timeout=5)
    assert out == {"reserve": "r-1", "charge": "c-1", "ship": "s-1"}
    assert calls.names() == ["reserve", "charge", "charge", "ship"], "only charge re-ran"
    key = f"{handle.id}/charge"
    assert calls.of("charge") == [{"attempt": 1, "key": key}] * 2, "same attempt, same key"

    c = await check(second, handle.id)
    assert c.info.state is SagaState.COMPLETED
    assert c.entries[: len(before.entries)] == before.entries, "the journal is append-only"
    assert c.steps(Kind.STEP_STARTED, Kind.STEP_COMPLETED) == [
        (Kind.STEP_STARTED, "reserve", 1),
        (Kind.STEP_COMPLETED, "reserve", 1),
        (Kind.STEP_STARTED, "charge", 1),
        (Kind.STEP_STARTED, "charge", 1),
        (Kind.STEP_COMPLETED, "charge", 1),
        (Kind.STEP_STARTED, "ship", 1),
        (Kind.STEP_COMPLETED, "ship", 1),
    ]
    assert c.projection.reruns == 1
    assert await recoveries(second, handle.id) == 0, "a clean close released the saga"


# -- code-first workflows ----------------------------------------------------------------------


def timestamped_flow(calls: Any, gate: asyncio.Event) -> Saga:
    async def book(ctx: Any, data: Any) -> str:
        calls.add("book", data=data)
        return "booked"

    async def stamp(ctx: Any, when: str) -> str:
        calls.add("stamp", when=when)
        await gate.wait()
        return f"stamped {when}"

    async def flow(ctx: WorkflowContext, data: Any) -> dict[str, Any]:
        when = ctx.now()
        booked = await ctx.step(book, data)
        stamped = await ctx.step(stamp, when.isoformat())
        return {"booked": booked, "stamped": stamped, "when": when.isoformat()}

    return Saga("Stamped", workflow=flow)


async def test_code_first_workflow_replays_recorded_now_in_a_new_app(
    apps: Apps, calls: Any, check: Any
) -> None:
    gate = asyncio.Event()
    first = apps.new(timestamped_flow(calls, gate))
    handle = await first.start("Stamped", {"room": 7})
    await eventually(lambda: len(calls.of("stamp")) == 1)
    await first.close()
    (when,) = {s["when"] for s in calls.of("stamp")}
    await asyncio.sleep(0.01)  # a replay that called now() again would see a later time

    gate.set()
    second = apps.new(timestamped_flow(calls, gate))
    out = await second.handle(handle.id).result(timeout=5)
    assert out == {"booked": "booked", "stamped": f"stamped {when}", "when": when}
    assert [s["when"] for s in calls.of("stamp")] == [when, when], "the replay saw the same now"
    assert calls.of("book") == [{"data": {"room": 7}}], "a recorded step is not run again"

    c = await check(second, handle.id)
    assert c.info.state is SagaState.COMPLETED
    (recorded,) = c.of(Kind.VALUE_RECORDED)
    assert (recorded.seq, recorded.data) == (0, {"name": "now", "value": when})
    assert decode(c.of(Kind.STEP_COMPLETED)[0].payload) == "booked"


def flow_saga(calls: Any, gate: asyncio.Event, *, changed: bool) -> Saga:
    async def alpha(ctx: Any, data: Any) -> str:
        calls.add("alpha")
        return "a"

    async def beta(ctx: Any, data: Any) -> str:
        calls.add("beta")
        return "b"

    async def blocker(ctx: Any, data: Any) -> str:
        calls.add("blocker")
        await gate.wait()
        return "done"

    async def original(ctx: WorkflowContext, data: Any) -> dict[str, Any]:
        ref = ctx.uuid()
        a = await ctx.step(alpha, data)
        b = await ctx.step(blocker, str(ref))
        return {"a": a, "b": b, "ref": str(ref)}

    async def edited(ctx: WorkflowContext, data: Any) -> dict[str, Any]:
        ref = ctx.uuid()
        first = await ctx.step(beta, data)  # was alpha
        return {"first": first, "ref": str(ref)}

    return Saga("Flow", workflow=edited if changed else original)


async def test_changed_workflow_parks_the_saga_then_the_original_code_finishes_it(
    apps: Apps, calls: Any, check: Any
) -> None:
    gate = asyncio.Event()
    first = apps.new(flow_saga(calls, gate, changed=False))
    handle = await first.start("Flow", "in")
    await eventually(lambda: calls.names() == ["alpha", "blocker"])
    await first.close()
    gate.set()

    changed = apps.new(flow_saga(calls, gate, changed=True))
    with pytest.raises(SagaFailed) as raised:
        await changed.handle(handle.id).result(timeout=5)
    assert raised.value.state is SagaState.NEEDS_ATTENTION
    assert calls.names() == ["alpha", "blocker"], "a disagreeing replay runs nothing"
    c = await check(changed, handle.id)
    assert c.info.state is SagaState.NEEDS_ATTENTION
    parked = c.entries[-1]
    assert parked.kind is Kind.SAGA_PARKED
    assert parked.error is not None
    assert parked.error["type"] == "NonDeterminismError"
    assert "'alpha'" in parked.error["message"]
    assert "'beta'" in parked.error["message"]
    assert c.of(Kind.SAGA_COMPENSATING) == [], "parked, not compensated"
    await changed.close()

    fixed = apps.new(flow_saga(calls, gate, changed=False))
    out = await (await fixed.retry(handle.id)).result(timeout=5)
    assert out["a"] == "a"
    assert calls.names() == ["alpha", "blocker", "blocker"]
    done = await check(fixed, handle.id)
    assert done.info.state is SagaState.COMPLETED
    (retry,) = done.of(Kind.OPERATOR_RETRY)
    assert retry.data == {"resume": "running"}


# -- PostgreSQL only: takeover from a worker that died, and fencing ----------------------------


async def test_pg_saga_of_a_worker_whose_connection_died_is_taken_over_and_fenced(
    pg_apps: Apps, calls: Any, check: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker A runs a saga and loses its database connection for good (as when its process
    dies); B takes the saga over within a second and finishes it. When A's stalled step
    returns, A's write is fenced out: the journal records B's run only."""

    caplog.set_level(logging.WARNING, logger="sagakit.worker")
    gate = asyncio.Event()

    async def reserve(ctx: Any, data: Any) -> str:
        calls.add("reserve")
        return "r"

    async def charge(ctx: Any, data: Any) -> str:
        calls.add("charge")
        if len(calls.of("charge")) == 1:  # A's run stalls here; B's goes through
            await gate.wait()
        calls.add("charge_returned")
        return "c"

    def saga() -> Saga:
        return Saga("Takeover", steps=[step("reserve", reserve), step("charge", charge)])

    a = pg_apps.new(saga(), poll_interval=NOTIFY_ONLY)
    handle = await a.start("Takeover", {"n": 1})
    await eventually(lambda: calls.names() == ["reserve", "charge"])

    # A's heartbeat dies as if its process had been killed: its connection closes and it never
    # registers another, so after a short grace A counts as dead (its 10 s lease is not waited).
    beat = a.store._beat_task  # type: ignore[attr-defined]
    beat.cancel()
    await asyncio.gather(beat, return_exceptions=True)

    b = pg_apps.new(saga(), poll_interval=0.05)
    assert await b.handle(handle.id).result(timeout=3) == {"reserve": "r", "charge": "c"}
    # taken over once (recoveries 1), then reset by its progress: it completed its steps
    assert await recoveries(b, handle.id) == 0
    taken = await check(b, handle.id)

    gate.set()  # A's step returns; A tries to record it
    await eventually(lambda: len(calls.of("charge_returned")) == 2)

    def fenced() -> bool:
        return any(
            r.getMessage().startswith(
                f"dropping saga {handle.id}: worker {a.store.worker_id} no longer owns"
            )
            for r in caplog.records
        )

    await eventually(fenced, timeout=1)  # A's write was refused by the fence, and A let go
    after = await check(b, handle.id)
    assert after.entries == taken.entries, "the fenced-out worker wrote nothing"
    assert after.info.state is SagaState.COMPLETED
    assert after.steps(Kind.STEP_STARTED, Kind.STEP_COMPLETED) == [
        (Kind.STEP_STARTED, "reserve", 1),
        (Kind.STEP_COMPLETED, "reserve", 1),
        (Kind.STEP_STARTED, "charge", 1),
        (Kind.STEP_STARTED, "charge", 1),
        (Kind.STEP_COMPLETED, "charge", 1),
    ]
    assert len(after.of(Kind.SAGA_COMPLETED)) == 1
    assert calls.names().count("reserve") == 1
