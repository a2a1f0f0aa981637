"""Saga and step definitions: what is accepted and what is rejected, with which error."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

from sagakit.definition import (
    DEFAULT_COMPENSATION_RETRY,
    NO_RETRY,
    RetryPolicy,
    Saga,
    Step,
    step,
)
from sagakit.errors import DefinitionError, DuplicateStepName, InvalidStep


@dataclasses.dataclass
class Order:
    order_id: str


def act(ctx: Any, data: Any) -> str:
    return "done"


def comp(ctx: Any, data: Any, result: Any) -> None:
    return None


async def aact(ctx: Any, data: Any) -> str:
    return "done"


async def acomp(ctx: Any, data: Any, result: Any) -> None:
    return None


async def workflow(ctx: Any, data: Any) -> None:
    return None


async def typed_workflow(ctx: Any, data: Order) -> None:
    return None


def sync_workflow(ctx: Any, data: Any) -> None:
    return None


async def one_arg_workflow(ctx: Any) -> None:
    return None


def test_step_defaults() -> None:
    s = step("reserve", act)
    assert s == Step(name="reserve", action=act)
    assert s.compensate is None
    assert s.retry is NO_RETRY
    assert s.retry.max_attempts == 1
    assert s.compensate_retry is DEFAULT_COMPENSATION_RETRY
    assert s.timeout is None


def test_valid_declarative_saga_compiles_to_a_workflow() -> None:
    policy = RetryPolicy(max_attempts=4)
    saga = Saga(
        "Order",
        steps=[
            step("reserve", act, compensate=comp, retry=policy, timeout=2.5),
            step("pay", aact, compensate=acomp),
            step("notify", act),
        ],
    )
    assert [s.name for s in saga.steps] == ["reserve", "pay", "notify"]
    assert saga.steps[0].retry is policy
    assert saga.steps[0].timeout == 2.5
    assert saga.version == 1
    assert inspect.iscoroutinefunction(saga.run())


def test_code_first_saga_runs_its_own_workflow() -> None:
    saga = Saga("Order", workflow=workflow, version=3, deadline=60)
    assert saga.run() is workflow
    assert saga.version == 3
    assert saga.deadline == 60


def test_input_type_comes_from_the_data_annotation_unless_given() -> None:
    assert Saga("A", workflow=typed_workflow).input_type is Order
    assert Saga("B", workflow=workflow).input_type is Any
    assert Saga("C", workflow=typed_workflow, input_type=dict).input_type is dict
    assert Saga("D", steps=[step("a", act)]).input_type is None


def test_definitions_are_frozen() -> None:
    saga = Saga("Order", steps=[step("a", act)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        saga.name = "Other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        saga.steps[0].name = "b"  # type: ignore[misc]


def test_duplicate_step_names_are_rejected() -> None:
    with pytest.raises(DuplicateStepName) as info:
        Saga("Order", steps=[step("pay", act), step("ship", act), step("pay", aact)])
    assert info.value.saga_type == "Order"
    assert info.value.step == "pay"
    assert "two steps named 'pay'" in str(info.value)
    assert isinstance(info.value, DefinitionError)


@pytest.mark.parametrize(
    ("make", "step_name", "reason"),
    [
        pytest.param(
            lambda: step("a", 42),  # type: ignore[arg-type]
            "a",
            "its action 42 is not callable",
            id="action",
        ),
        pytest.param(
            lambda: step("a", act, compensate="undo"),  # type: ignore[arg-type]
            "a",
            "its compensation 'undo' is not callable",
            id="compensation",
        ),
        pytest.param(
            lambda: step("a", lambda ctx: None),
            "a",
            "must accept 2 positional arguments",
            id="action-too-few",
        ),
        pytest.param(
            lambda: step("a", comp),
            "a",
            "its action comp must accept 2 positional arguments",
            id="action-too-many",
        ),
        pytest.param(
            lambda: step("a", act, compensate=act),
            "a",
            "its compensation act must accept 3 positional arguments",
            id="compensation-too-few",
        ),
        pytest.param(
            lambda: step("a", lambda ctx, *, data: None),
            "a",
            "must accept 2 positional arguments",
            id="action-keyword-only",
        ),
        pytest.param(lambda: step("", act), "", "non-empty string", id="empty-name"),
        pytest.param(lambda: step("a/b", act), "a/b", "without '/'", id="slash-name"),
        pytest.param(lambda: step(7, act), "7", "non-empty string", id="int-name"),  # type: ignore[arg-type]
        pytest.param(lambda: step("a", act, timeout=0), "a", "timeout must be > 0", id="t0"),
        pytest.param(lambda: step("a", act, timeout=-1.5), "a", "got -1.5", id="negative"),
        pytest.param(lambda: step("a", act, timeout=float("nan")), "a", "timeout", id="nan"),
        pytest.param(
            lambda: step("a", act, retry=3),  # type: ignore[arg-type]
            "a",
            "3 is not a RetryPolicy",
            id="retry",
        ),
        pytest.param(
            lambda: step("a", act, compensate_retry={"max_attempts": 2}),  # type: ignore[arg-type]
            "a",
            "is not a RetryPolicy",
            id="compensate-retry",
        ),
    ],
)
def test_invalid_steps_are_rejected(make: Any, step_name: str, reason: str) -> None:
    with pytest.raises(InvalidStep) as info:
        Saga("Order", steps=[make()])
    assert info.value.saga_type == "Order"
    assert info.value.step == step_name
    assert reason in info.value.reason
    assert str(info.value).startswith(f"step {step_name!r} of saga 'Order' is invalid: ")


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda *args: None, id="varargs"),
        pytest.param(lambda ctx, data, extra=None: None, id="defaults"),
        pytest.param(max, id="builtin-without-signature"),
    ],
)
def test_flexible_callables_are_accepted(fn: Any) -> None:
    saga = Saga("Order", steps=[step("a", fn)])
    assert saga.steps[0].action is fn


def test_callable_objects_are_accepted() -> None:
    class Reserve:
        def __call__(self, ctx: Any, data: Any) -> None:
            return None

    action = Reserve()
    assert Saga("Order", steps=[step("a", action)]).steps[0].action is action


def test_steps_must_be_built_with_step() -> None:
    with pytest.raises(InvalidStep, match=r"built with sagakit\.step"):
        Saga("Order", steps=["reserve"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="neither"),
        pytest.param({"steps": []}, id="empty-steps"),
        pytest.param({"steps": [step("a", act)], "workflow": workflow}, id="both"),
    ],
)
def test_exactly_one_of_steps_and_workflow(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidStep, match="either steps=") as info:
        Saga("Order", **kwargs)
    assert info.value.saga_type == "Order"


@pytest.mark.parametrize("name", ["", None, 5])
def test_saga_name_must_be_a_non_empty_string(name: Any) -> None:
    with pytest.raises(InvalidStep, match="saga name must be a non-empty string"):
        Saga(name, workflow=workflow)


@pytest.mark.parametrize("deadline", [0, -10, float("nan")])
def test_bad_deadline_is_rejected(deadline: float) -> None:
    with pytest.raises(InvalidStep, match="deadline must be > 0"):
        Saga("Order", workflow=workflow, deadline=deadline)


def test_sync_workflow_function_is_rejected() -> None:
    with pytest.raises(InvalidStep, match="async def") as info:
        Saga("Order", workflow=sync_workflow)  # type: ignore[arg-type]
    assert info.value.saga_type == "Order"


def test_workflow_with_wrong_arity_is_rejected() -> None:
    with pytest.raises(InvalidStep, match="its workflow one_arg_workflow must accept 2"):
        Saga("Order", workflow=one_arg_workflow)  # type: ignore[arg-type]
