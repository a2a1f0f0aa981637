"""The failure points of a saga, found from its clean run, and the end state each must reach.

Ids are stable, so that one point can be run again alone:

- ``clean``: no failure;
- ``error@<step>``: every attempt of the step's action raises (only the first attempt of a
  retriable step, which is retried until it succeeds);
- ``error@undo:<step>``: every attempt of the step's compensation raises. A compensation runs
  only if a later step fails, so the action of the *last* step that can still fail (the pivot,
  or the last compensatable step) fails too: every compensation due after this one runs first;
- ``crash@<n>``: the process dies at the clean run's ``n``-th journal write (1-based), before
  that write is durable: it, and what was queued before it, are lost. The saga is recovered
  from its journal and run to the end;
- ``error@<step>+crash@<n>``: the same on the way back: ``<step>`` (the last step whose failure
  compensates every compensatable step before it) fails, and the process dies at the ``n``-th
  write of that run, from the write that records the failure on.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from sagakit.definition import Saga, StepKind, flatten
from sagakit.errors import ConfigurationError
from sagakit.journal import Entry, Kind, SagaState
from sagakit.testing.faults import CallRecord, Fault, Write


class PointKind(enum.StrEnum):
    CLEAN = "clean"
    ERROR = "error"
    UNDO = "undo"
    CRASH = "crash"


@dataclass(frozen=True, slots=True, kw_only=True)
class FailurePoint:
    """One failure that explore injects.

    Attributes:
        id: ``clean``, ``error@<step>``, ``error@undo:<step>``, ``crash@<n>`` or
            ``error@<step>+crash@<n>`` (see the module's docstring).
        kind: which of the four (the last is a crash, with ``step`` set).
        step: the step whose action (``error``) or compensation (``undo``) fails.
        trigger: for ``undo``, the later step whose action fails so that compensation starts.
        checkpoint: for ``crash``, the journal write (1-based) the process dies at; with
            ``step`` set, that step fails first and the write is one of that run's.
        first_attempt_only: for ``error``, only the first attempt fails (a retriable step).
        expected: the end state the saga must reach.
        description: what is injected, in words.
    """

    id: str
    kind: PointKind
    expected: SagaState
    description: str
    step: str | None = None
    trigger: str | None = None
    checkpoint: int | None = None
    first_attempt_only: bool = False

    def faults(self) -> tuple[Fault, ...]:
        """The errors to inject for this point."""
        if self.kind in (PointKind.ERROR, PointKind.CRASH) and self.step is not None:
            return (Fault(step=self.step, first_attempt_only=self.first_attempt_only),)
        if self.kind is PointKind.UNDO and self.step is not None and self.trigger is not None:
            return (Fault(step=self.step, compensation=True), Fault(step=self.trigger))
        return ()


@dataclass(frozen=True, slots=True, kw_only=True)
class StepInfo:
    """A step as the clean run met it."""

    name: str
    kind: StepKind
    group: int | None
    completed: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What the clean run showed: the steps in call order, which steps have compensations
    (None for a code-first workflow, whose compensations only its code knows), the journal
    writes, and the end state."""

    steps: tuple[StepInfo, ...]
    compensable: frozenset[str] | None
    writes: tuple[Write, ...]
    end: SagaState


def declared_compensations(saga: Saga) -> frozenset[str] | None:
    """The steps of a declarative saga that have a compensation; None for a workflow."""
    if not saga.steps:
        return None
    return frozenset(s.name for s in flatten(saga.steps) if s.compensate is not None)


def plan_of(
    saga: Saga,
    calls: Sequence[CallRecord],
    journal: Sequence[Entry],
    writes: Sequence[Write],
    end: SagaState,
) -> Plan:
    groups: dict[str, int | None] = {}
    completed: set[str] = set()
    for e in journal:
        if e.kind in (Kind.STEP_STARTED, Kind.STEP_COMPLETED) and e.step is not None:
            groups[e.step] = (e.data or {}).get("group", groups.get(e.step))
            if e.kind is Kind.STEP_COMPLETED:
                completed.add(e.step)
    steps: dict[str, StepInfo] = {}
    for c in calls:
        if not c.compensation and c.step not in steps:
            steps[c.step] = StepInfo(
                name=c.step, kind=c.kind, group=groups.get(c.step), completed=c.step in completed
            )
    return Plan(
        steps=tuple(steps.values()),
        compensable=declared_compensations(saga),
        writes=tuple(writes),
        end=end,
    )


def _same_group(a: StepInfo, b: StepInfo) -> bool:
    return a.group is not None and a.group == b.group


def _past_no_return(plan: Plan, index: int) -> bool:
    """Whether a pivot or retriable step completed before the step at ``index``: a failure
    there parks the saga instead of compensating it."""
    here = plan.steps[index]
    return any(
        s.completed and s.kind is not StepKind.COMPENSATABLE and not _same_group(s, here)
        for s in plan.steps[:index]
    )


def _error_point(plan: Plan, index: int) -> FailurePoint:
    s = plan.steps[index]
    if s.kind is StepKind.RETRIABLE:
        return FailurePoint(
            id=f"error@{s.name}",
            kind=PointKind.ERROR,
            step=s.name,
            expected=plan.end,
            first_attempt_only=True,
            description=f"{s.name} fails its first attempt",
        )
    expected = SagaState.NEEDS_ATTENTION if _past_no_return(plan, index) else SagaState.FAILED
    return FailurePoint(
        id=f"error@{s.name}",
        kind=PointKind.ERROR,
        step=s.name,
        expected=expected,
        description=f"{s.name} always fails",
    )


def _trigger(plan: Plan, index: int) -> StepInfo | None:
    """The last step after the one at ``index`` whose failure still compensates it."""
    here = plan.steps[index]
    found: StepInfo | None = None
    for later, s in enumerate(plan.steps[index + 1 :], start=index + 1):
        if _same_group(s, here) or _past_no_return(plan, later):
            continue
        if s.kind is not StepKind.RETRIABLE:
            found = s
    return found


def _undo_point(plan: Plan, index: int) -> FailurePoint | None:
    s = plan.steps[index]
    if not s.completed or s.kind is not StepKind.COMPENSATABLE:
        return None
    if plan.compensable is not None and s.name not in plan.compensable:
        return None
    trigger = _trigger(plan, index)
    if trigger is None:
        return None  # nothing after it can fail: its compensation never runs
    return FailurePoint(
        id=f"error@undo:{s.name}",
        kind=PointKind.UNDO,
        step=s.name,
        trigger=trigger.name,
        expected=SagaState.NEEDS_ATTENTION,
        description=f"compensation of {s.name} always fails ({trigger.name} fails)",
    )


def points_of(plan: Plan) -> list[FailurePoint]:
    """Every failure point of a saga whose clean run gave ``plan``, clean first."""
    clean = FailurePoint(
        id="clean", kind=PointKind.CLEAN, expected=plan.end, description="no failure"
    )
    errors = [_error_point(plan, i) for i in range(len(plan.steps))]
    undos = [p for i in range(len(plan.steps)) if (p := _undo_point(plan, i)) is not None]
    return [clean, *errors, *undos, *crash_points(plan.writes, plan.end)]


def crash_points(
    writes: Sequence[Write], expected: SagaState, after: FailurePoint | None = None
) -> list[FailurePoint]:
    """A crash at each of ``writes``; ``after``: the error point whose run made them."""
    prefix = "" if after is None else f"{after.id}+"
    then = "" if after is None else f"{after.step} fails; "
    return [
        FailurePoint(
            id=f"{prefix}crash@{w.n}",
            kind=PointKind.CRASH,
            checkpoint=w.n,
            step=None if after is None else after.step,
            expected=expected,
            description=f"{then}crash before write {w.n}/{len(writes)}: {w.describe()}",
        )
        for w in writes
    ]


def compensating(points: Sequence[FailurePoint]) -> FailurePoint | None:
    """The error point whose run compensates the most steps: the last that ends failed."""
    failing = [p for p in points if p.kind is PointKind.ERROR and p.expected is SagaState.FAILED]
    return failing[-1] if failing else None


def compensation_crashes(base: FailurePoint, writes: Sequence[Write]) -> list[FailurePoint]:
    """Crash points on ``base``'s way back: at each of its writes from the one that records
    the step's failure on (the writes before it are the clean run's)."""
    first = next((w.n for w in writes if any(e.kind is Kind.STEP_FAILED for e in w.entries)), None)
    if first is None:
        return []
    points = crash_points(writes, base.expected, after=base)
    return [p for p in points if (p.checkpoint or 0) >= first]


def select(
    points: Sequence[FailurePoint],
    only: str | Sequence[str] | None,
    expect: Mapping[str, SagaState | str] | None,
) -> list[FailurePoint]:
    """The points to run (``only`` those ids, if given), with ``expect``'s end states.

    Raises:
        ConfigurationError: an id in ``only`` or ``expect`` is not a point of this saga.
    """
    known = {p.id: p for p in points}
    wanted = [only] if isinstance(only, str) else list(only or ())
    unknown = [i for i in [*wanted, *(expect or {})] if i not in known]
    if unknown:
        raise ConfigurationError(
            f"no failure point {unknown[0]!r} in this saga; its points are: {', '.join(known)}"
        )
    chosen = [known[i] for i in dict.fromkeys(wanted)] if wanted else list(points)
    overrides = {k: SagaState(v) for k, v in (expect or {}).items()}
    return [replace(p, expected=overrides[p.id]) if p.id in overrides else p for p in chosen]
