"""Journal entries and the projection of a journal to a saga's state. Pure: no I/O.

The journal is the truth: every entry a saga writes is appended here, and the saga row
(state, current step, output, error) is :func:`project` of its entries.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


class SagaState(enum.StrEnum):
    STARTED = "started"
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    FAILED = "failed"
    NEEDS_ATTENTION = "needs_attention"
    CANCELLED = "cancelled"


TERMINAL = frozenset({SagaState.COMPLETED, SagaState.FAILED, SagaState.CANCELLED})
ACTIVE = frozenset({SagaState.STARTED, SagaState.RUNNING, SagaState.COMPENSATING})


class Kind(enum.StrEnum):
    SAGA_STARTED = "saga_started"
    STEP_STARTED = "step_started"
    STEP_RETRYING = "step_retrying"
    STEP_COMPLETED = "step_completed"
    STEP_FAILED = "step_failed"
    VALUE_RECORDED = "value_recorded"
    SAGA_COMPLETED = "saga_completed"
    SAGA_COMPENSATING = "saga_compensating"
    COMPENSATION_STARTED = "compensation_started"
    COMPENSATION_RETRYING = "compensation_retrying"
    COMPENSATION_COMPLETED = "compensation_completed"
    COMPENSATION_EXHAUSTED = "compensation_exhausted"
    SAGA_FAILED = "saga_failed"
    SAGA_PARKED = "saga_parked"
    OPERATOR_RETRY = "operator_retry"
    OPERATOR_RESOLVED = "operator_resolved"
    TIMER_STARTED = "timer_started"
    TIMER_FIRED = "timer_fired"
    SIGNAL_WAITING = "signal_waiting"
    SIGNAL_RECEIVED = "signal_received"
    SIGNAL_TIMED_OUT = "signal_timed_out"
    CANCEL_REQUESTED = "cancel_requested"
    SAGA_CANCELLED = "saga_cancelled"
    REPLY_IGNORED = "reply_ignored"  # a remote step's reply that came too late or twice
    EVENT_RECORDED = "event_recorded"  # a choreography event, recorded by the tracker


# The state each kind moves the saga to; None leaves it where it is.
TRANSITIONS: dict[Kind, SagaState | None] = {
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
    Kind.OPERATOR_RETRY: None,  # resolved by the entry's ``resume`` field, see project()
    Kind.OPERATOR_RESOLVED: SagaState.FAILED,
    Kind.TIMER_STARTED: SagaState.RUNNING,
    Kind.TIMER_FIRED: SagaState.RUNNING,
    Kind.SIGNAL_WAITING: SagaState.RUNNING,
    Kind.SIGNAL_RECEIVED: SagaState.RUNNING,
    Kind.SIGNAL_TIMED_OUT: SagaState.RUNNING,
    Kind.CANCEL_REQUESTED: None,  # or the entry's ``resume`` state, for a parked saga
    Kind.SAGA_CANCELLED: SagaState.CANCELLED,
    Kind.REPLY_IGNORED: None,
    Kind.EVENT_RECORDED: SagaState.RUNNING,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One journal entry.

    ``index`` is the entry's position in its saga's journal; ``seq`` the position of the
    workflow command (step or recorded value) it belongs to. ``payload`` is codec-encoded JSON
    text (a step's result, the saga's input or output); ``data`` holds small JSON metadata.
    """

    saga_id: str
    index: int
    kind: Kind
    at: float
    seq: int | None = None
    step: str | None = None
    attempt: int | None = None
    payload: str | None = None
    error: dict[str, Any] | None = None
    data: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CompletedStep:
    seq: int
    step: str
    payload: str | None
    data: dict[str, Any] | None = None  # {"group": n} in a parallel group, {"child": id}


@dataclass(slots=True, kw_only=True)
class Projection:
    """What a journal says about its saga. Built by :func:`project`."""

    state: SagaState = SagaState.STARTED
    current_step: str | None = None  # the last forward step: where a failed saga failed
    output: str | None = None
    error: dict[str, Any] | None = None
    next_index: int = 0
    # workflow seq -> outcome entry (completed / failed / recorded value)
    outcomes: dict[int, Entry] = field(default_factory=dict)
    # seq -> the last attempt started or retried, for steps without an outcome yet
    attempts: dict[int, int] = field(default_factory=dict)
    completed: list[CompletedStep] = field(default_factory=list)
    compensated: set[int] = field(default_factory=set)
    compensation_attempts: dict[int, int] = field(default_factory=dict)
    compensation_data: dict[int, dict[str, Any]] = field(default_factory=dict)  # last started
    started: set[tuple[int, int]] = field(default_factory=set)
    started_names: dict[int, str] = field(default_factory=dict)  # seq -> step started there
    started_data: dict[int, dict[str, Any]] = field(default_factory=dict)  # seq -> its data
    step_starts: int = 0
    reruns: int = 0
    waits: dict[int, Entry] = field(default_factory=dict)  # seq -> timer/signal wait entry
    signal_ids: set[str] = field(default_factory=set)  # signals already delivered
    cancel: Entry | None = None  # the cancel request, once the saga took it
    operator_retries: int = 0  # compensation attempts are numbered afresh after each

    def owed(self) -> list[CompletedStep]:
        """Completed steps not yet compensated, in the order they must be compensated."""
        return [c for c in reversed(self.completed) if c.seq not in self.compensated]


def state_after(e: Entry) -> SagaState | None:
    """The state entry ``e`` moves its saga to, or None if it leaves the state alone."""
    if e.kind is Kind.OPERATOR_RETRY:
        return SagaState((e.data or {}).get("resume", SagaState.COMPENSATING))
    if e.kind is Kind.CANCEL_REQUESTED:
        resume = (e.data or {}).get("resume")
        return None if resume is None else SagaState(resume)
    if e.kind is Kind.EVENT_RECORDED:  # the tracker says which state the event leaves
        return SagaState((e.data or {}).get("state", SagaState.RUNNING))
    return TRANSITIONS[e.kind]


def _apply_step(p: Projection, e: Entry) -> None:
    assert e.seq is not None
    if e.kind is Kind.STEP_STARTED:
        attempt = e.attempt or 1
        p.step_starts += 1
        if (e.seq, attempt) in p.started:
            p.reruns += 1  # the same attempt started twice: a body re-run after recovery
        p.started.add((e.seq, attempt))
        p.started_names[e.seq] = e.step or ""
        p.attempts[e.seq] = attempt
        if e.data:
            p.started_data[e.seq] = e.data
    elif e.kind is Kind.STEP_RETRYING:
        p.attempts[e.seq] = (e.attempt or 1) + 1
        p.started_data.pop(e.seq, None)
    elif e.kind in (Kind.STEP_COMPLETED, Kind.STEP_FAILED, Kind.VALUE_RECORDED):
        p.outcomes[e.seq] = e
        p.attempts.pop(e.seq, None)
        # A remote step that timed out may have acted in its service: it is compensated too.
        if e.kind is Kind.STEP_COMPLETED or (
            e.kind is Kind.STEP_FAILED and (e.data or {}).get("uncertain")
        ):
            p.completed.append(
                CompletedStep(seq=e.seq, step=e.step or "", payload=e.payload, data=e.data)
            )


def _apply_compensation(p: Projection, e: Entry) -> None:
    assert e.seq is not None
    if e.kind is Kind.COMPENSATION_STARTED:
        p.compensation_attempts[e.seq] = e.attempt or 1
        if e.data:
            p.compensation_data[e.seq] = e.data
    elif e.kind is Kind.COMPENSATION_COMPLETED:
        p.compensated.add(e.seq)


WAITS = frozenset({Kind.TIMER_STARTED, Kind.SIGNAL_WAITING})


def _apply_wait(p: Projection, e: Entry) -> None:
    assert e.seq is not None
    if e.kind in WAITS:
        p.waits[e.seq] = e
        return
    p.outcomes[e.seq] = e
    if e.kind is Kind.SIGNAL_RECEIVED:
        p.signal_ids.add(str((e.data or {}).get("signal_id")))


_STEP_KINDS = frozenset(
    {
        Kind.STEP_STARTED,
        Kind.STEP_RETRYING,
        Kind.STEP_COMPLETED,
        Kind.STEP_FAILED,
        Kind.VALUE_RECORDED,
    }
)


_WAIT_KINDS = WAITS | {Kind.TIMER_FIRED, Kind.SIGNAL_RECEIVED, Kind.SIGNAL_TIMED_OUT}


def apply(p: Projection, e: Entry) -> None:
    """Fold one entry into the projection (in place, for speed on long journals)."""
    p.next_index = e.index + 1
    kind = e.kind
    state = state_after(e)
    if kind is Kind.OPERATOR_RETRY:
        p.operator_retries += 1
        p.compensation_attempts.clear()
        p.compensation_data.clear()
    if state is not None:
        p.state = state
    if e.step is not None and (kind in _STEP_KINDS or kind is Kind.EVENT_RECORDED):
        p.current_step = e.step
    if kind in _STEP_KINDS:
        _apply_step(p, e)
    elif kind in (Kind.COMPENSATION_STARTED, Kind.COMPENSATION_COMPLETED):
        _apply_compensation(p, e)
    elif kind in _WAIT_KINDS:
        _apply_wait(p, e)
    elif kind is Kind.CANCEL_REQUESTED:
        p.cancel = e
    elif kind is Kind.REPLY_IGNORED:
        p.signal_ids.add(str((e.data or {}).get("signal_id")))
    elif kind is Kind.SAGA_COMPLETED:
        p.output = e.payload
    if e.error is not None:
        p.error = e.error


def project(entries: Iterable[Entry]) -> Projection:
    """The saga state a journal describes."""
    p = Projection()
    for e in entries:
        apply(p, e)
    return p


# Entries that show a saga got past where a crash could have stopped it: after one, a saga's
# count of takeovers from dead workers starts again from zero.
PROGRESS = frozenset(
    {
        Kind.STEP_COMPLETED,
        Kind.STEP_FAILED,
        Kind.COMPENSATION_COMPLETED,
        Kind.SAGA_COMPLETED,
        Kind.SAGA_FAILED,
        Kind.SAGA_CANCELLED,
        Kind.TIMER_FIRED,
        Kind.SIGNAL_RECEIVED,
        Kind.SIGNAL_TIMED_OUT,
    }
)

# A saga taken over from dead workers max_recoveries times in a row (the default here) without
# getting further is a suspect: a worker runs at most one suspect at a time. A saga that kills
# its workers is on every worker that dies because of it, so it is a suspect no later than
# the sagas that merely shared a worker with it; from then on it dies alone, and only it goes
# past the limit to be parked.
SUSPECT_AFTER = 5


def made_progress(entries: Iterable[Entry]) -> bool:
    return any(e.kind in PROGRESS for e in entries)


def row_changes(entries: Iterable[Entry]) -> dict[str, Any]:
    """The saga-row columns that appending ``entries`` changes: the projection at write time."""
    changes: dict[str, Any] = {}
    for e in entries:
        state = state_after(e)
        if state is not None:
            changes["state"] = state
        if e.step is not None and (e.kind in _STEP_KINDS or e.kind is Kind.EVENT_RECORDED):
            changes["current_step"] = e.step
        if e.kind is Kind.SAGA_COMPLETED:
            changes["output"] = e.payload
        if e.error is not None:
            changes["error"] = e.error
        changes["updated_at"] = e.at
    return changes
