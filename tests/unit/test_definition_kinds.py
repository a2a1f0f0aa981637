"""Step kinds (compensatable, pivot, retriable) and parallel groups are checked when a saga
is defined, with messages that say why."""

from __future__ import annotations

from typing import Any

import pytest

from sagakit import InvalidStep, Saga, parallel, step
from sagakit.definition import FOREVER, StepKind, flatten


async def act(ctx: Any, data: Any) -> None:
    return None


async def undo(ctx: Any, data: Any, result: Any) -> None:
    return None


def test_parallel_group_definitions_are_checked() -> None:
    with pytest.raises(InvalidStep, match="at least two"):
        Saga("One", steps=[parallel(step("a", act))])
    with pytest.raises(InvalidStep, match="pivot cannot be in a parallel"):
        Saga("P", steps=[parallel(step("a", act, pivot=True), step("b", act))])


def test_step_kinds_are_checked_at_definition() -> None:
    with pytest.raises(InvalidStep, match="comes after the pivot 'charge'"):
        Saga(
            "K",
            steps=[
                step("charge", act, pivot=True),
                step("late", act, compensate=undo),
            ],
        )
    with pytest.raises(InvalidStep, match="cannot have a compensation"):
        Saga("K", steps=[step("charge", act, compensate=undo, pivot=True)])
    with pytest.raises(InvalidStep, match="at most one"):
        Saga("K", steps=[step("p1", act, pivot=True), step("p2", act, pivot=True)])
    with pytest.raises(InvalidStep, match="before the retriable"):
        Saga("K", steps=[step("r", act, retriable=True), step("p", act, pivot=True)])
    with pytest.raises(InvalidStep, match="either the pivot or retriable"):
        step("x", act, pivot=True, retriable=True)


def test_kinds_and_the_retry_of_retriable_steps() -> None:
    saga = Saga(
        "Order",
        steps=[
            step("reserve", act, compensate=undo),
            parallel(step("a", act, compensate=undo), step("b", act)),
            step("charge", act, pivot=True),
            step("ship", act, retriable=True),
        ],
    )
    kinds = [s.kind for s in flatten(saga.steps)]
    assert kinds == [
        StepKind.COMPENSATABLE,
        StepKind.COMPENSATABLE,
        StepKind.COMPENSATABLE,
        StepKind.PIVOT,
        StepKind.RETRIABLE,
    ]
    ship = next(s for s in flatten(saga.steps) if s.name == "ship")
    assert ship.retry.max_attempts == FOREVER


def test_a_plain_step_after_the_pivot_must_be_retriable() -> None:
    with pytest.raises(InvalidStep, match="mark it retriable=True"):
        Saga("K", steps=[step("charge", act, pivot=True), step("mail", act)])
