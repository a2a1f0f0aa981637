"""The journal projection: state transitions, owed compensations, attempts and reruns."""

from __future__ import annotations

from typing import Any

import pytest

from sagakit.journal import (
    ACTIVE,
    TERMINAL,
    TRANSITIONS,
    CompletedStep,
    Entry,
    Kind,
    Projection,
    SagaState,
    apply,
    project,
)

SAGA_ID = "saga-1"

_STEP_KINDS = {
    Kind.STEP_STARTED,
    Kind.STEP_RETRYING,
    Kind.STEP_COMPLETED,
    Kind.STEP_FAILED,
    Kind.VALUE_RECORDED,
    Kind.COMPENSATION_STARTED,
    Kind.COMPENSATION_RETRYING,
    Kind.COMPENSATION_COMPLETED,
    Kind.COMPENSATION_EXHAUSTED,
}


class Journal:
    """Builds a journal with consecutive indexes and timestamps."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def add(self, kind: Kind, **fields: Any) -> Journal:
        index = len(self.entries)
        self.entries.append(
            Entry(saga_id=SAGA_ID, index=index, kind=kind, at=1000.0 + index, **fields)
        )
        return self

    def started(self) -> Journal:
        return self.add(Kind.SAGA_STARTED, payload='{"order":"A1"}')

    def start_step(self, seq: int, attempt: int = 1) -> Journal:
        return self.add(Kind.STEP_STARTED, seq=seq, step=f"s{seq}", attempt=attempt)

    def complete_step(self, seq: int, attempt: int = 1) -> Journal:
        return self.add(
            Kind.STEP_COMPLETED, seq=seq, step=f"s{seq}", attempt=attempt, payload=f'"r{seq}"'
        )

    def step(self, seq: int) -> Journal:
        return self.start_step(seq).complete_step(seq)

    def compensate(self, seq: int, attempt: int = 1) -> Journal:
        self.add(Kind.COMPENSATION_STARTED, seq=seq, step=f"s{seq}", attempt=attempt)
        return self.add(Kind.COMPENSATION_COMPLETED, seq=seq, step=f"s{seq}", attempt=attempt)

    def project(self) -> Projection:
        return project(self.entries)


# The state each kind moves a saga to, written out by hand so a change to the table is a
# deliberate one. None: the state is left where it was.
EXPECTED_TRANSITIONS: dict[Kind, SagaState | None] = {
    Kind.SAGA_STARTED: SagaState.STARTED,
    Kind.STEP_STARTED: SagaState.RUNNING,
    Kind.STEP_RETRYING: SagaState.RUNNING,
    Kind.STEP_COMPLETED: SagaState.RUNNING,
    Kind.STEP_FAILED: SagaState.RUNNING,
    Kind.VALUE_RECORDED: None,
    Kind.SAGA_COMPLETED: SagaState.COMPLETED,
    Kind.SAGA_COMPENSATING: SagaState.COMPENSATING,
    Kind.COMPENSATION_STARTED: SagaState.COMPENSATING,
    Kind.COMPENSATION_RETRYING: SagaState.COMPENSATING,
    Kind.COMPENSATION_COMPLETED: SagaState.COMPENSATING,
    Kind.COMPENSATION_EXHAUSTED: SagaState.NEEDS_ATTENTION,
    Kind.SAGA_FAILED: SagaState.FAILED,
    Kind.SAGA_PARKED: SagaState.NEEDS_ATTENTION,
    Kind.OPERATOR_RETRY: None,
    Kind.OPERATOR_RESOLVED: SagaState.FAILED,
    Kind.TIMER_STARTED: SagaState.RUNNING,
    Kind.TIMER_FIRED: SagaState.RUNNING,
    Kind.SIGNAL_WAITING: SagaState.RUNNING,
    Kind.SIGNAL_RECEIVED: SagaState.RUNNING,
    Kind.SIGNAL_TIMED_OUT: SagaState.RUNNING,
    Kind.CANCEL_REQUESTED: None,
    Kind.SAGA_CANCELLED: SagaState.CANCELLED,
    Kind.REPLY_IGNORED: None,
    Kind.EVENT_RECORDED: SagaState.RUNNING,
}


def test_transition_table_covers_every_kind_and_is_pinned() -> None:
    assert set(TRANSITIONS) == set(Kind)
    assert TRANSITIONS == EXPECTED_TRANSITIONS


def test_state_sets_are_disjoint_and_needs_attention_is_neither() -> None:
    assert not TERMINAL & ACTIVE
    assert SagaState.NEEDS_ATTENTION not in TERMINAL | ACTIVE
    assert TERMINAL | ACTIVE | {SagaState.NEEDS_ATTENTION} == set(SagaState)


def _entry_fields(kind: Kind) -> dict[str, Any]:
    if kind in _STEP_KINDS:
        return {"seq": 0, "step": "s0", "attempt": 1}
    if kind.value.startswith(("timer_", "signal_")):
        return {"seq": 1, "data": {"name": "n", "until": 1.0, "signal_id": "x"}}
    return {}


@pytest.mark.parametrize("kind", list(Kind))
def test_each_kind_moves_a_running_saga_to_its_state(kind: Kind) -> None:
    journal = Journal().started().start_step(0)
    assert journal.project().state is SagaState.RUNNING

    p = journal.add(kind, **_entry_fields(kind)).project()

    expected = EXPECTED_TRANSITIONS[kind]
    if kind is Kind.OPERATOR_RETRY:
        expected = SagaState.COMPENSATING  # no ``resume`` field: the default
    elif expected is None:
        expected = SagaState.RUNNING
    assert p.state is expected


@pytest.mark.parametrize(
    "kind",
    [
        k
        for k, state in EXPECTED_TRANSITIONS.items()
        if state is None and k is not Kind.OPERATOR_RETRY
    ],
)
def test_kinds_without_transition_leave_any_state_alone(kind: Kind) -> None:
    parked = Journal().started().add(Kind.SAGA_PARKED, error={"type": "X", "message": "m"})
    assert parked.project().state is SagaState.NEEDS_ATTENTION
    p = parked.add(kind, seq=5, step="ctx.now", data={"name": "now", "value": "t"}).project()
    assert p.state is SagaState.NEEDS_ATTENTION


def test_empty_journal_projects_to_a_fresh_started_saga() -> None:
    p = project([])
    assert p.state is SagaState.STARTED
    assert p.next_index == 0
    assert p.current_step is None
    assert p.output is None
    assert p.error is None
    assert p.owed() == []


def test_happy_path_completes_with_output_and_next_index() -> None:
    journal = Journal().started().step(0).step(1)
    journal.add(Kind.SAGA_COMPLETED, payload='{"s0":"r0","s1":"r1"}')
    p = journal.project()
    assert p.state is SagaState.COMPLETED
    assert p.output == '{"s0":"r0","s1":"r1"}'
    assert p.current_step == "s1"
    assert p.next_index == len(journal.entries) == 6
    assert p.error is None
    assert [c.step for c in p.completed] == ["s0", "s1"]
    assert p.attempts == {}
    assert set(p.outcomes) == {0, 1}
    assert p.step_starts == 2
    assert p.reruns == 0


def test_step_payload_is_not_the_saga_output() -> None:
    p = Journal().started().step(0).project()
    assert p.output is None
    assert p.outcomes[0].payload == '"r0"'


def test_current_step_is_kept_by_entries_without_a_step() -> None:
    journal = Journal().started().step(0).step(1)
    journal.add(Kind.SAGA_COMPENSATING, error={"type": "E", "message": "m"})
    assert journal.project().current_step == "s1"


def test_last_error_wins_and_is_not_cleared_by_entries_without_error() -> None:
    journal = Journal().started().start_step(0)
    journal.add(Kind.STEP_RETRYING, seq=0, step="s0", attempt=1, error={"message": "first"})
    journal.start_step(0, attempt=2)
    assert journal.project().error == {"message": "first"}
    journal.add(Kind.STEP_FAILED, seq=0, step="s0", attempt=2, error={"message": "second"})
    journal.add(Kind.SAGA_COMPENSATING)
    journal.add(Kind.SAGA_FAILED)
    p = journal.project()
    assert p.state is SagaState.FAILED
    assert p.error == {"message": "second"}


def test_failed_step_and_recorded_value_are_outcomes_but_not_completed() -> None:
    journal = Journal().started()
    journal.add(Kind.VALUE_RECORDED, seq=0, data={"name": "now", "value": "2024-01-01"})
    journal.start_step(1)
    journal.add(Kind.STEP_FAILED, seq=1, step="s1", attempt=1, error={"message": "no"})
    p = journal.project()
    assert p.outcomes[0].kind is Kind.VALUE_RECORDED
    assert p.outcomes[1].kind is Kind.STEP_FAILED
    assert p.completed == []
    assert p.attempts == {}
    assert p.owed() == []


def test_owed_is_strict_reverse_order_of_completion_not_of_seq() -> None:
    # Three steps started in seq order but, run in parallel, completed as 1, 0, 2; step 3 failed.
    journal = Journal().started()
    for seq in range(4):
        journal.start_step(seq)
    journal.complete_step(1).complete_step(0).complete_step(2)
    journal.add(Kind.STEP_FAILED, seq=3, step="s3", attempt=1, error={"message": "boom"})
    journal.add(Kind.SAGA_COMPENSATING, error={"message": "boom"})
    p = journal.project()

    assert p.state is SagaState.COMPENSATING
    assert [c.seq for c in p.owed()] == [2, 0, 1]
    assert p.owed()[0] == CompletedStep(seq=2, step="s2", payload='"r2"')


def test_compensated_steps_leave_owed_and_started_ones_stay() -> None:
    journal = Journal().started().step(0).step(1).step(2)
    journal.add(Kind.SAGA_COMPENSATING, error={"message": "later step failed"})
    journal.compensate(2)
    journal.add(Kind.COMPENSATION_STARTED, seq=1, step="s1", attempt=1)
    p = journal.project()
    assert [c.step for c in p.owed()] == ["s1", "s0"]  # s1 started compensating, not done
    assert p.compensated == {2}

    journal.add(Kind.COMPENSATION_COMPLETED, seq=1, step="s1", attempt=1).compensate(0)
    journal.add(Kind.SAGA_FAILED)
    p = journal.project()
    assert p.owed() == []
    assert p.compensated == {0, 1, 2}
    assert p.state is SagaState.FAILED


def test_exhausted_compensation_needs_attention_and_stays_owed() -> None:
    journal = Journal().started().step(0).step(1)
    journal.add(Kind.SAGA_COMPENSATING)
    journal.compensate(1)
    for attempt in (1, 2):
        journal.add(Kind.COMPENSATION_STARTED, seq=0, step="s0", attempt=attempt)
        journal.add(
            Kind.COMPENSATION_RETRYING, seq=0, step="s0", attempt=attempt, error={"m": attempt}
        )
    journal.add(Kind.COMPENSATION_STARTED, seq=0, step="s0", attempt=3)
    journal.add(Kind.COMPENSATION_EXHAUSTED, seq=0, step="s0", attempt=3, error={"m": 3})
    p = journal.project()
    assert p.state is SagaState.NEEDS_ATTENTION
    assert [c.seq for c in p.owed()] == [0]
    assert p.compensation_attempts[0] == 3
    assert p.error == {"m": 3}


def test_same_attempt_started_twice_counts_a_rerun() -> None:
    journal = Journal().started().start_step(0).start_step(0)
    p = journal.project()
    assert p.step_starts == 2
    assert p.reruns == 1
    assert p.attempts == {0: 1}


def test_different_steps_with_same_attempt_are_not_reruns() -> None:
    p = Journal().started().start_step(0).start_step(1).start_step(2).project()
    assert p.step_starts == 3
    assert p.reruns == 0


def test_rerun_of_a_step_that_then_completes_still_counts() -> None:
    p = Journal().started().start_step(0).start_step(0).complete_step(0).project()
    assert p.reruns == 1
    assert p.attempts == {}
    assert [c.seq for c in p.completed] == [0]


def test_a_retry_is_not_a_rerun() -> None:
    journal = Journal().started().start_step(0)
    journal.add(Kind.STEP_RETRYING, seq=0, step="s0", attempt=1, error={"message": "x"})
    journal.start_step(0, attempt=2)
    assert journal.project().reruns == 0
    # The attempt-2 body re-run after a crash is exactly one rerun.
    assert journal.start_step(0, attempt=2).project().reruns == 1


def test_attempts_resume_after_step_retrying() -> None:
    journal = Journal().started().start_step(0)
    assert journal.project().attempts == {0: 1}
    journal.add(Kind.STEP_RETRYING, seq=0, step="s0", attempt=1, error={"message": "x"})
    assert journal.project().attempts == {0: 2}  # a crash here resumes at attempt 2
    journal.start_step(0, attempt=2)
    journal.add(Kind.STEP_RETRYING, seq=0, step="s0", attempt=2, error={"message": "y"})
    assert journal.project().attempts == {0: 3}
    journal.start_step(0, attempt=3).complete_step(0, attempt=3)
    p = journal.project()
    assert p.attempts == {}
    assert p.outcomes[0].attempt == 3


def test_step_started_without_attempt_counts_as_attempt_one() -> None:
    p = Journal().started().add(Kind.STEP_STARTED, seq=0, step="s0").project()
    assert p.attempts == {0: 1}


def test_compensation_attempts_track_the_last_started() -> None:
    journal = Journal().started().step(0).add(Kind.SAGA_COMPENSATING)
    journal.add(Kind.COMPENSATION_STARTED, seq=0, step="s0", attempt=1)
    journal.add(Kind.COMPENSATION_RETRYING, seq=0, step="s0", attempt=1, error={"m": 1})
    journal.add(Kind.COMPENSATION_STARTED, seq=0, step="s0", attempt=2)
    assert journal.project().compensation_attempts == {0: 2}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"resume": "running"}, SagaState.RUNNING),
        ({"resume": "compensating"}, SagaState.COMPENSATING),
        ({}, SagaState.COMPENSATING),
        (None, SagaState.COMPENSATING),
    ],
)
def test_operator_retry_resumes_the_state_its_entry_names(
    data: dict[str, Any] | None, expected: SagaState
) -> None:
    journal = Journal().started().step(0).add(Kind.SAGA_COMPENSATING)
    journal.add(Kind.COMPENSATION_STARTED, seq=0, step="s0", attempt=5)
    journal.add(Kind.COMPENSATION_EXHAUSTED, seq=0, step="s0", attempt=5, error={"m": 1})
    before = journal.project()
    assert before.state is SagaState.NEEDS_ATTENTION
    assert before.compensation_attempts == {0: 5}

    p = journal.add(Kind.OPERATOR_RETRY, data=data).project()
    assert p.state is expected
    assert p.compensation_attempts == {}  # the operator grants a fresh set of attempts
    assert [c.seq for c in p.owed()] == [0]


def test_operator_retry_of_a_parked_saga_resumes_running() -> None:
    journal = Journal().started().step(0)
    journal.add(Kind.SAGA_PARKED, error={"type": "NonDeterminismError", "message": "m"})
    journal.add(Kind.OPERATOR_RETRY, data={"resume": "running"}).start_step(1)
    p = journal.project()
    assert p.state is SagaState.RUNNING
    assert p.current_step == "s1"


def test_operator_resolved_ends_failed() -> None:
    journal = Journal().started().add(Kind.SAGA_PARKED, error={"m": "x"})
    p = journal.add(Kind.OPERATOR_RESOLVED, data={"note": "refunded by hand"}).project()
    assert p.state is SagaState.FAILED
    assert p.state in TERMINAL


def test_apply_folds_like_project() -> None:
    journal = Journal().started().step(0).start_step(1)
    journal.add(Kind.STEP_FAILED, seq=1, step="s1", attempt=1, error={"m": 1})
    journal.add(Kind.SAGA_COMPENSATING).compensate(0).add(Kind.SAGA_FAILED)
    folded = Projection()
    for e in journal.entries:
        apply(folded, e)
    assert folded == journal.project()


def test_entries_are_immutable() -> None:
    entry = Journal().started().entries[0]
    with pytest.raises(AttributeError):
        entry.kind = Kind.SAGA_FAILED  # type: ignore[misc]
