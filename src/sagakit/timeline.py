"""A saga's timeline: its journal as rows of step and compensation attempts. Pure: no I/O.

Used by ``sagakit show``; each row has the attempt, its outcome, how long it took and the error
or note that goes with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sagakit.journal import Entry, Kind


@dataclasses.dataclass(slots=True, kw_only=True)
class TimelineRow:
    """One line of a saga's timeline: a step attempt, a compensation attempt or a saga event."""

    at: float
    what: str
    attempt: int | None = None
    outcome: str = ""
    took: float | None = None
    detail: str = ""


_OPENS = {
    Kind.STEP_STARTED: "step",
    Kind.COMPENSATION_STARTED: "undo",
    Kind.TIMER_STARTED: "wait",
    Kind.SIGNAL_WAITING: "wait",
}
_CLOSES = {
    Kind.TIMER_FIRED: ("wait", "fired"),
    Kind.SIGNAL_RECEIVED: ("wait", "received"),
    Kind.SIGNAL_TIMED_OUT: ("wait", "timed out"),
    Kind.STEP_RETRYING: ("step", "retrying"),
    Kind.STEP_COMPLETED: ("step", "completed"),
    Kind.STEP_FAILED: ("step", "failed"),
    Kind.COMPENSATION_RETRYING: ("undo", "retrying"),
    Kind.COMPENSATION_COMPLETED: ("undo", "compensated"),
    Kind.COMPENSATION_EXHAUSTED: ("undo", "exhausted"),
}
_EVENTS = {
    Kind.SAGA_STARTED: "saga started",
    Kind.VALUE_RECORDED: "value recorded",
    Kind.SAGA_COMPENSATING: "compensating",
    Kind.SAGA_COMPLETED: "saga completed",
    Kind.SAGA_FAILED: "saga failed, compensated",
    Kind.SAGA_PARKED: "needs attention",
    Kind.OPERATOR_RETRY: "operator retry",
    Kind.OPERATOR_RESOLVED: "resolved by operator",
    Kind.CANCEL_REQUESTED: "cancel requested",
    Kind.SAGA_CANCELLED: "saga cancelled, compensated",
    Kind.REPLY_IGNORED: "reply ignored",
    Kind.EVENT_RECORDED: "event",
}
_INTERRUPTED = "interrupted"


def _detail(e: Entry) -> str:
    data = e.data or {}
    parts = [f"{e.error.get('type')}: {e.error.get('message')}"] if e.error else []
    if e.kind is Kind.SAGA_COMPENSATING and e.error and e.error.get("type") == "StepFailed":
        parts = ["a step failed for good (above)"]
    if "retry_in" in data:
        parts.append(f"retry in {data['retry_in']:.3f} s")
    if e.kind is Kind.VALUE_RECORDED:
        parts.append(f"ctx.{data.get('name')}() = {data.get('value')!r}")
    if "reason" in data:
        parts.append(f"reason: {data['reason']}")
    if "child" in data:
        parts.append(f"child saga {data['child']}")
    if e.kind is Kind.EVENT_RECORDED and data.get("service"):
        parts.append(f"from {data['service']}")
    if "note" in data:
        parts.append(str(data["note"]))
    if "owed" in data:
        parts.append(f"compensations owed: {', '.join(map(str, data['owed']))}")
    return "; ".join(parts)


def timeline(entries: Sequence[Entry], *, active: bool) -> list[TimelineRow]:
    """The journal as rows: each step attempt and compensation attempt with its outcome and
    duration (started -> completed/failed/retrying), and the saga's own events. An attempt
    started again without an outcome was interrupted (its process stopped) and re-run."""
    rows: list[TimelineRow] = []
    running: dict[tuple[str, int | None], TimelineRow] = {}
    for e in entries:
        if e.kind in _OPENS:
            lane = _OPENS[e.kind]
            if (old := running.get((lane, e.seq))) is not None and lane != "wait":
                old.outcome, old.detail = _INTERRUPTED, "re-run after recovery"
            what = _wait_label(e) if lane == "wait" else _label(lane, e.step)
            outcome = "waiting" if lane == "wait" else "running"
            row = TimelineRow(at=e.at, what=what, attempt=e.attempt, outcome=outcome)
            running[(lane, e.seq)] = row
        elif e.kind in _CLOSES:
            lane, outcome = _CLOSES[e.kind]
            found = running.pop((lane, e.seq), None)
            what = _wait_label(e) if lane == "wait" else _label(lane, e.step)
            row = found or TimelineRow(at=e.at, what=what, attempt=e.attempt)
            row.outcome, row.took, row.detail = outcome, e.at - row.at, _detail(e)
            if found is not None:
                continue
        else:
            what = _EVENTS[e.kind]
            if e.kind is Kind.EVENT_RECORDED:
                what = f"event {(e.data or {}).get('event', e.step)}"
            row = TimelineRow(at=e.at, what=what, detail=_detail(e))
        rows.append(row)
    for row in running.values():
        if not active:
            row.outcome = _INTERRUPTED
    return rows


def _label(lane: str, step: str | None) -> str:
    return f"↩ {step}" if lane == "undo" else str(step)


def _wait_label(e: Entry) -> str:
    data = e.data or {}
    if e.kind in (Kind.TIMER_STARTED, Kind.TIMER_FIRED):
        return "⏱ sleep"
    return f"✉ signal {data.get('name')!r}"
