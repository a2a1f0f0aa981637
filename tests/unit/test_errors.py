"""The exception tree: one root, attributes on every error, messages that say what to do."""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest

import sagakit
import sagakit.errors
from sagakit.errors import (
    ConfigurationError,
    CorruptPayload,
    DatabaseOwned,
    DuplicateSagaType,
    DuplicateStepName,
    InvalidRetryPolicy,
    InvalidSagaState,
    InvalidStep,
    NonDeterminismError,
    NotSerializable,
    SagaDeadlineExceeded,
    SagaFailed,
    SagakitError,
    SagaNotFound,
    SchemaTooNew,
    StepFailed,
    StepTimedOut,
    UnknownSagaType,
)
from sagakit.journal import SagaState

ALL_ERRORS = [
    obj
    for obj in vars(sagakit.errors).values()
    if inspect.isclass(obj)
    and issubclass(obj, BaseException)
    and obj.__module__ == "sagakit.errors"
]


def test_there_are_errors_to_check() -> None:
    assert len(ALL_ERRORS) >= 20


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_is_a_sagakit_error_and_public(cls: type[BaseException]) -> None:
    assert issubclass(cls, SagakitError)
    assert issubclass(cls, Exception)
    assert cls.__name__ in sagakit.__all__
    assert getattr(sagakit, cls.__name__) is cls


def _docstring_tree() -> dict[str, str]:
    """child -> parent, as drawn in the errors module docstring (the block after ``::``)."""
    doc = sagakit.errors.__doc__ or ""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in doc[doc.index("::") :].splitlines()[1:]:
        match = re.search(r"[A-Z]\w+", line)
        if match is None:
            continue
        depth = match.start()
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[match.group()] = stack[-1][1]
        stack.append((depth, match.group()))
    return parents


def test_docstring_tree_matches_the_classes() -> None:
    drawn = _docstring_tree()
    actual = {
        cls.__name__: cls.__mro__[1].__name__ for cls in ALL_ERRORS if cls is not SagakitError
    }
    assert drawn == actual


CASES: list[tuple[BaseException, dict[str, Any], list[str]]] = [
    (
        DatabaseOwned("/srv/orders.db"),
        {"path": "/srv/orders.db"},
        ["/srv/orders.db.lock", "stop it first", "worker=False"],
    ),
    (
        DuplicateStepName("Order", "pay"),
        {"saga_type": "Order", "step": "pay"},
        ["'Order' has two steps named 'pay'", "must be unique"],
    ),
    (
        InvalidStep("Order", "pay", "its action 3 is not callable"),
        {"saga_type": "Order", "step": "pay", "reason": "its action 3 is not callable"},
        ["step 'pay' of saga 'Order' is invalid: its action 3 is not callable"],
    ),
    (
        InvalidRetryPolicy("backoff must be >= 1"),
        {"reason": "backoff must be >= 1"},
        ["invalid RetryPolicy: backoff must be >= 1"],
    ),
    (
        DuplicateSagaType("Order", 2),
        {"saga_type": "Order", "version": 2},
        ["'Order' version 2 is already registered", "bump its version"],
    ),
    (
        UnknownSagaType("Ordr", ["Refund", "Order"]),
        {"saga_type": "Ordr", "known": ["Refund", "Order"]},
        ["no saga type 'Ordr'", "(registered: Order, Refund)", "app.register", "@app.saga"],
    ),
    (
        UnknownSagaType("Order", []),
        {"known": []},
        ["(registered: none)"],
    ),
    (
        SagaNotFound("5f1c"),
        {"saga_id": "5f1c"},
        ["no saga with id '5f1c'", "sagakit list"],
    ),
    (
        InvalidSagaState("5f1c", SagaState.COMPLETED, "retry", "needs_attention"),
        {"saga_id": "5f1c", "state": SagaState.COMPLETED, "action": "retry"},
        ["cannot retry saga 5f1c: it is completed; only a saga that is needs_attention can be"],
    ),
    (
        NotSerializable("the result of step 'pay'", "a value of type set is not supported"),
        {"what": "the result of step 'pay'", "reason": "a value of type set is not supported"},
        ["the result of step 'pay' cannot be stored as JSON", "Use dict/list", "Decimal"],
    ),
    (
        CorruptPayload("unknown tag 'x'"),
        {"reason": "unknown tag 'x'"},
        ["not valid sagakit JSON: unknown tag 'x'"],
    ),
    (
        SchemaTooNew("/srv/orders.db", 5, 3),
        {"location": "/srv/orders.db", "found": 5, "supported": 3},
        ["schema version 5", "supports up to 3", "upgrade sagakit", "Nothing was changed"],
    ),
    (
        StepFailed("5f1c", "pay", 3, {"type": "CardDeclined", "message": "insufficient funds"}),
        {"saga_id": "5f1c", "step": "pay", "attempts": 3, "error_type": "CardDeclined"},
        ["step 'pay' of saga 5f1c failed after 3 attempts: CardDeclined: insufficient funds"],
    ),
    (
        StepFailed("5f1c", "pay", 1, {}),
        {"error_type": "Exception", "message": "", "error": {}},
        ["failed after 1 attempt: Exception: "],
    ),
    (
        StepTimedOut("5f1c", "process_payment", after=30.0, attempt=2, of=3),
        {"saga_id": "5f1c", "step": "process_payment", "after": 30.0, "attempt": 2, "of": 3},
        [
            "step 'process_payment' of saga 5f1c timed out after 30.0 s; "
            "it will be retried (attempt 2 of 3)"
        ],
    ),
    (
        StepTimedOut("5f1c", "pay", after=1.5, attempt=3, of=3),
        {"attempt": 3, "of": 3},
        ["timed out after 1.5 s; no attempts are left (attempt 3 of 3)"],
    ),
    (
        SagaDeadlineExceeded("5f1c", "ship", 1700000000.0),
        {"saga_id": "5f1c", "step": "ship", "deadline": 1700000000.0},
        ["passed its deadline before step 'ship' could start", "compensate"],
    ),
    (
        NonDeterminismError("5f1c", 4, "step 'reserve'", "step 'charge'"),
        {"saga_id": "5f1c", "seq": 4, "expected": "step 'reserve'", "got": "step 'charge'"},
        ["replayed step 'charge' at position 4", "recorded step 'reserve'", "sagakit retry"],
    ),
    (
        SagaFailed("5f1c", SagaState.FAILED, {"type": "StepFailed", "message": "no stock"}),
        {"saga_id": "5f1c", "state": SagaState.FAILED},
        ["saga 5f1c ended failed: StepFailed: no stock"],
    ),
]


@pytest.mark.parametrize(
    ("exc", "attrs", "phrases"),
    CASES,
    ids=[f"{type(c[0]).__name__}-{i}" for i, c in enumerate(CASES)],
)
def test_errors_carry_attributes_and_say_what_to_do(
    exc: BaseException, attrs: dict[str, Any], phrases: list[str]
) -> None:
    for name, value in attrs.items():
        assert getattr(exc, name) == value
    message = str(exc)
    for phrase in phrases:
        assert phrase in message


def test_saga_failed_without_error_is_terse() -> None:
    assert str(SagaFailed("5f1c", SagaState.CANCELLED, None)) == "saga 5f1c ended cancelled"


def test_one_except_clause_catches_them_all() -> None:
    with pytest.raises(SagakitError):
        raise StepTimedOut("s", "pay", after=1.0, attempt=1, of=1)
    with pytest.raises(ConfigurationError):
        raise DatabaseOwned("x.db")
