"""The rules of a tracked choreography (sagakit.tracker_flow): no I/O."""

from __future__ import annotations

import pytest

from sagakit.errors import ConfigurationError
from sagakit.journal import Entry, Kind, SagaState, project
from sagakit.messaging import Envelope
from sagakit.tracker_flow import Flow

FLOW = Flow.of(
    "OrderChoreography",
    starts="OrderCreated",
    steps=["ReserveInventory", "InventoryReserved", "ProcessPayment", "PaymentProcessed"],
    completes=["OrderFulfilled"],
    fails=["PaymentFailed", "InventoryUnavailable"],
    compensations={"InventoryReserved": "InventoryReleased"},
    events=["ReleaseInventory"],
)


def started() -> list[Entry]:
    return [Entry(saga_id="s1", index=0, kind=Kind.SAGA_STARTED, at=0.0, payload="{}")]


def event(kind: str, n: int = 0, service: str = "svc") -> Envelope:
    return Envelope.new(kind, {"n": n}, correlation_id="s1", message_id=f"{kind}-{n}",
                        headers={"service": service})  # fmt: skip


def feed(journal: list[Entry], *kinds: str, at: float = 1.0) -> list[Entry]:
    for kind in kinds:
        journal = journal + FLOW.record(event(kind), journal, at=at)
    return journal


def test_a_completed_flow() -> None:
    journal = feed(started(), "OrderCreated", "ReserveInventory", "InventoryReserved",
                   "ProcessPayment", "PaymentProcessed", "OrderFulfilled")  # fmt: skip
    kinds = [e.kind for e in journal]
    assert kinds == [Kind.SAGA_STARTED, *[Kind.EVENT_RECORDED] * 6, Kind.SAGA_COMPLETED]
    assert [e.index for e in journal] == list(range(8))
    assert project(journal).state is SagaState.COMPLETED
    assert journal[-1].payload == event("OrderFulfilled").payload
    recorded = journal[1]
    assert recorded.step == "OrderCreated"
    assert recorded.data == {
        "event": "OrderCreated",
        "message_id": "OrderCreated-0",
        "causation_id": None,
        "service": "svc",
        "state": "running",
    }


def test_a_failure_compensates_what_went_forward() -> None:
    journal = feed(started(), "OrderCreated", "InventoryReserved", "PaymentFailed")
    assert journal[-1].kind is Kind.SAGA_COMPENSATING
    assert journal[-1].data == {"event": "PaymentFailed", "owed": ["InventoryReleased"]}
    assert journal[-1].error is not None
    assert journal[-1].error["type"] == "PaymentFailed"
    assert project(journal).state is SagaState.COMPENSATING
    journal = feed(journal, "ReleaseInventory")
    assert project(journal).state is SagaState.COMPENSATING
    journal = feed(journal, "InventoryReleased")
    assert journal[-1].kind is Kind.SAGA_FAILED
    assert project(journal).state is SagaState.FAILED


def test_a_failure_with_nothing_to_compensate_fails_at_once() -> None:
    journal = feed(started(), "OrderCreated", "InventoryUnavailable")
    assert journal[-1].kind is Kind.SAGA_FAILED
    assert journal[-1].error is not None
    assert journal[-1].error["type"] == "InventoryUnavailable"
    assert project(journal).state is SagaState.FAILED


def test_a_compensation_seen_before_the_failure_is_not_owed() -> None:
    """Topics are consumed independently: a compensation may be recorded first."""
    journal = feed(started(), "InventoryReserved", "InventoryReleased", "PaymentFailed")
    assert journal[-1].kind is Kind.SAGA_FAILED


def test_a_message_is_recorded_once() -> None:
    journal = feed(started(), "OrderCreated")
    assert FLOW.record(event("OrderCreated"), journal, at=2.0) == []


def test_an_ended_saga_stays_ended() -> None:
    journal = feed(started(), "OrderCreated", "OrderFulfilled")
    later = feed(journal, "InventoryReserved", "PaymentFailed")
    assert project(later).state is SagaState.COMPLETED
    assert not [e for e in later[len(journal) :] if e.kind is not Kind.EVENT_RECORDED]


def test_a_stall_names_the_last_event_and_the_next() -> None:
    journal = feed(started(), "OrderCreated", "ReserveInventory", "InventoryReserved", at=10.0)
    assert FLOW.stall(journal, now=39.0, deadline=30.0) == []
    [parked] = FLOW.stall(journal, now=40.5, deadline=30.0)
    assert parked.kind is Kind.SAGA_PARKED
    assert parked.index == len(journal)
    assert parked.error is not None
    assert parked.error["type"] == "FlowStalled"
    assert parked.error["message"] == (
        "no event for 30.5 s after InventoryReserved (from svc); expected ProcessPayment, "
        "or a completion (OrderFulfilled)"
    )
    journal = [*journal, parked]
    assert project(journal).state is SagaState.NEEDS_ATTENTION
    assert FLOW.stall(journal, now=100.0, deadline=30.0) == []  # parked once
    # A late event moves it on.
    journal = feed(journal, "ProcessPayment", at=101.0)
    assert project(journal).state is SagaState.RUNNING


def test_a_stall_while_compensating_names_what_is_owed() -> None:
    journal = feed(started(), "InventoryReserved", "PaymentFailed", at=1.0)
    [parked] = FLOW.stall(journal, now=5.0, deadline=1.0)
    assert parked.error is not None
    assert parked.error["message"].endswith("expected InventoryReleased (undoes InventoryReserved)")
    journal = feed([*journal, parked], "InventoryReleased", at=6.0)
    assert project(journal).state is SagaState.FAILED


def test_after_the_last_step_a_completion_is_expected() -> None:
    journal = feed(started(), "PaymentProcessed", at=0.0)
    [parked] = FLOW.stall(journal, now=5.0, deadline=1.0)
    assert parked.error is not None
    assert parked.error["message"].endswith("expected a completion (OrderFulfilled)")


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"steps": ["OrderCreated"]}, "one role"),
        ({"fails": ["OrderFulfilled"]}, "one role"),
        ({"compensations": {"PaymentFailed": "X"}}, "forward events"),
        ({"completes": []}, "completes"),
        ({"events": ["bad topic"]}, "invalid event type"),
    ],
)
def test_bad_flows_are_refused(kwargs: dict[str, object], says: str) -> None:
    args: dict[str, object] = {"starts": "OrderCreated", "completes": ["OrderFulfilled"]}
    with pytest.raises(ConfigurationError, match=says):
        Flow.of("T", **{**args, **kwargs})  # type: ignore[arg-type]


def test_topics_are_every_event_once() -> None:
    assert FLOW.topics == (
        "OrderCreated", "ReserveInventory", "InventoryReserved", "ProcessPayment",
        "PaymentProcessed", "OrderFulfilled", "InventoryUnavailable", "PaymentFailed",
        "InventoryReleased", "ReleaseInventory",
    )  # fmt: skip
