"""The pytest plugin sagakit installs: an App on a temporary database with a virtual clock, and
explore's failure points re-run alone from the command line."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from sagakit import App, Kind, Saga, SignalTimedOut, step
from sagakit.clock import VirtualClock

pytest_plugins = ["pytester"]


def greet(ctx: Any, data: Any) -> str:
    return f"hello {data['name']}"


async def test_the_fixtures_give_an_app_on_a_temporary_database_with_a_virtual_clock(
    sagakit_app: App, sagakit_clock: VirtualClock, sagakit_db_url: str, tmp_path: Path
) -> None:
    assert sagakit_db_url == f"sqlite:///{tmp_path / 'sagakit.db'}"
    assert isinstance(sagakit_clock, VirtualClock)
    assert sagakit_app.clock is sagakit_clock
    sagakit_app.register(Saga("Hello", steps=[step("greet", greet)]))

    handle = await sagakit_app.start("Hello", {"name": "Ada"})

    assert await handle.result(timeout=5) == {"greet": "hello Ada"}
    assert (tmp_path / "sagakit.db").exists()


async def ask(ctx: Any, data: Any) -> str:
    return f"approve {data['amount']}?"


def approval_app(app: App) -> None:
    @app.saga("Approval")
    async def approval(ctx: Any, data: Any) -> str:
        await ctx.step(ask, data, name="ask")
        try:
            decision = await ctx.wait_for_signal("decision", timeout=timedelta(days=3))
        except SignalTimedOut:
            return "escalated"
        return str(decision)


async def waiting(app: App, saga_id: str) -> None:
    """Until the saga waits for its signal (it is unloaded then)."""
    for _ in range(500):
        if any(e.kind is Kind.SIGNAL_WAITING for e in await app.journal(saga_id)):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the saga never waited for its signal")


@pytest.mark.parametrize(("answer_on_day", "outcome"), [(None, "escalated"), (2, "approved")])
async def test_a_three_day_approval_runs_in_milliseconds(
    sagakit_app: App, sagakit_clock: VirtualClock, answer_on_day: int | None, outcome: str
) -> None:
    approval_app(sagakit_app)
    began = time.perf_counter()
    handle = await sagakit_app.start("Approval", {"amount": 500})
    await waiting(sagakit_app, handle.id)

    if answer_on_day is not None:
        await sagakit_clock.advance(timedelta(days=answer_on_day))
        await sagakit_app.signal(handle.id, "decision", "approved")
    else:
        await sagakit_clock.advance(timedelta(days=3))

    assert await handle.result(timeout=5) == outcome
    assert time.perf_counter() - began < 3, "three virtual days took real seconds"


USER_TEST = """
from sagakit import Saga, step

rooms = set()


def book(ctx, data):
    rooms.add(ctx.saga_id)
    return "room-7"


def cancel(ctx, data, room):
    pass  # the bug: it forgets to give the room back


def pay(ctx, data):
    return "paid"


async def test_trip(sagakit_app, sagakit_explore):
    sagakit_app.register(
        Saga("Trip", steps=[step("book", book, compensate=cancel), step("pay", pay)])
    )

    def no_room_left_behind(run):
        if run.state == "failed":
            assert run.saga_id not in rooms, "room left booked"

    report = await sagakit_explore(sagakit_app, "Trip", {}, invariant=no_room_left_behind)
    report.raise_for_failures()
"""


def test_a_users_test_shows_the_failing_point_and_reruns_it_alone(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_trip=USER_TEST)

    result = pytester.runpytest_subprocess()

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*ExplorationFailed: explore Trip: * FAILED*",
            "*error@pay * pay always fails * failed * failed * FAILED",
            "*- invariant: AssertionError: room left booked",
            "*re-run one point alone: explore(..., only='error@pay')",
        ]
    )

    again = pytester.runpytest_subprocess("--sagakit-point", "error@pay")

    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*explore Trip: 1 failure point: 0 ok, 1 FAILED"])
