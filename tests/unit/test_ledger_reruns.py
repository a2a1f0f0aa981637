"""The ledger's check for committed steps run again: call times against journal outcome times."""

from __future__ import annotations

from sagakit import Entry, Kind
from sagakit.ledger import Call, committed_reruns


def call(step: str, at: float, *, compensation: bool = False, saga_id: str = "s") -> Call:
    return Call(saga_id=saga_id, step=step, compensation=compensation, operation="Op",
                attempt=1, at=at, pid=1)  # fmt: skip


def entry(index: int, kind: Kind, at: float, step: str | None = None) -> Entry:
    return Entry(saga_id="s", index=index, kind=kind, at=at, seq=0 if step else None, step=step)


JOURNAL = [
    entry(0, Kind.SAGA_STARTED, 1.0),
    entry(1, Kind.STEP_STARTED, 2.0, "reserve"),
    entry(2, Kind.STEP_COMPLETED, 3.0, "reserve"),
    entry(3, Kind.STEP_STARTED, 4.0, "charge"),
    entry(4, Kind.STEP_FAILED, 5.0, "charge"),
    entry(5, Kind.SAGA_COMPENSATING, 6.0),
    entry(6, Kind.COMPENSATION_STARTED, 7.0, "reserve"),
    entry(7, Kind.COMPENSATION_COMPLETED, 8.0, "reserve"),
    entry(8, Kind.SAGA_FAILED, 9.0),
]


def test_calls_before_their_outcome_are_fine() -> None:
    calls = [
        call("reserve", 2.1),
        call("reserve", 2.5),  # re-run after a crash, before the outcome was written
        call("charge", 4.1),
        call("reserve", 7.1, compensation=True),
        call("reserve", 6.5, saga_id="other"),  # another saga's step of the same name
    ]
    assert committed_reruns(calls, {"s": JOURNAL}) == []


def test_a_call_after_its_step_completed_or_failed_is_a_committed_rerun() -> None:
    late = [call("reserve", 3.5), call("charge", 5.5), call("reserve", 8.5, compensation=True)]
    assert committed_reruns(late, {"s": JOURNAL}) == late


def test_a_compensation_is_judged_by_its_own_outcome_not_the_steps() -> None:
    # The compensation of reserve runs after reserve completed: that is no re-run.
    assert committed_reruns([call("reserve", 7.5, compensation=True)], {"s": JOURNAL}) == []
