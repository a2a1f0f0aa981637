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

A remote step (a command to a service) fails where explore plays the broker: at
``error@<step>`` its service replies ``SagaStepFailed`` without running the handler, at
``error@undo:<step>`` it does so to the compensation's command. Remote steps have more points:

- ``timeout@<step>`` (a step with a timeout): its command is lost, so it times out. A timed-out
  remote step may have acted: the saga compensates it too (with result None);
- ``noreply@<step>`` (a step with a timeout): its service handles the command, but the reply is
  lost, so it times out although it acted: its compensation must undo an effect whose result
  it never saw;
- ``dup@<step>``: its command is handled twice (a redelivery, or a re-sent attempt that the
  inbox does not know): the handler must be idempotent by ``ctx.idempotency_key``, and answer
  the same both times;
- ``dup@undo:<step>`` (a remote compensation): its command is handled twice, a later step
  failing as for ``error@undo:<step>``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from sagakit.definition import Saga, StepKind, flatten
from sagakit.errors import ConfigurationError
from sagakit.journal import Entry, Kind, SagaState
from sagakit.remote import Remote
from sagakit.testing.faults import CallRecord, Effect, Fault, Write


class PointKind(enum.StrEnum):
    CLEAN = "clean"
    ERROR = "error"
    UNDO = "undo"
    CRASH = "crash"
    TIMEOUT = "timeout"  # remote: the command is lost
    NOREPLY = "noreply"  # remote: the reply is lost
    DUP = "dup"  # remote: the command is handled twice


REMOTE_KINDS = frozenset({PointKind.TIMEOUT, PointKind.NOREPLY, PointKind.DUP})
_EFFECTS = {
    PointKind.TIMEOUT: Effect.DROP,
    PointKind.NOREPLY: Effect.LOSE_REPLY,
    PointKind.DUP: Effect.DUPLICATE,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class FailurePoint:
    """One failure that explore injects.

    Attributes:
        id: ``clean``, ``error@<step>``, ``error@undo:<step>``, ``crash@<n>``,
            ``error@<step>+crash@<n>``; for remote steps also ``timeout@<step>``,
            ``noreply@<step>``, ``dup@<step>`` and ``dup@undo:<step>`` (see the module's
            docstring).
        kind: which kind of failure (``error@<step>+crash@<n>`` is a crash with ``step`` set;
            ``dup@undo:<step>`` a duplicate with ``trigger`` set).
        step: the step whose action (``error``) or compensation (``undo``) fails, or whose
            command is lost, unanswered or duplicated.
        trigger: for ``undo`` (and ``dup@undo:``), the later step whose action fails so that
            compensation starts.
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
        effect = _EFFECTS.get(self.kind)
        if effect is None or self.step is None:
            return ()
        if self.trigger is not None:  # dup@undo: the compensation, which the trigger starts
            return (
                Fault(step=self.step, compensation=True, effect=effect),
                Fault(step=self.trigger),
            )
        return (Fault(step=self.step, effect=effect, first_attempt_only=self.first_attempt_only),)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepInfo:
    """A step as the clean run met it: ``remote`` if a command to a service, ``timeout`` if
    it has one."""

    name: str
    kind: StepKind
    group: int | None
    completed: bool
    remote: bool = False
    timeout: bool = False


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


def remote_compensations(saga: Saga, journal: Sequence[Entry]) -> frozenset[str]:
    """The steps whose compensation is a command: declared, or seen sent in ``journal``."""
    sent = {
        e.step or ""
        for e in journal
        if e.kind is Kind.COMPENSATION_STARTED and (e.data or {}).get("topic")
    }
    declared = {s.name for s in flatten(saga.steps) if isinstance(s.compensate, Remote)}
    return frozenset(sent | declared)


def plan_of(
    saga: Saga,
    calls: Sequence[CallRecord],
    journal: Sequence[Entry],
    writes: Sequence[Write],
    end: SagaState,
) -> Plan:
    groups: dict[str, int | None] = {}
    completed: set[str] = set()
    remote: set[str] = set()
    timed: set[str] = set()
    for e in journal:
        if e.kind in (Kind.STEP_STARTED, Kind.STEP_COMPLETED) and e.step is not None:
            data = e.data or {}
            groups[e.step] = data.get("group", groups.get(e.step))
            if e.kind is Kind.STEP_COMPLETED:
                completed.add(e.step)
            elif data.get("topic"):
                remote.add(e.step)
                if data.get("ends") is not None:
                    timed.add(e.step)
    steps: dict[str, StepInfo] = {}
    for c in calls:
        if not c.compensation and c.step not in steps:
            steps[c.step] = StepInfo(
                name=c.step,
                kind=c.kind,
                group=groups.get(c.step),
                completed=c.step in completed,
                remote=c.step in remote,
                timeout=c.step in timed,
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
    how = " (its service replies failed)" if s.remote else ""
    return FailurePoint(
        id=f"error@{s.name}",
        kind=PointKind.ERROR,
        step=s.name,
        expected=expected,
        description=f"{s.name} always fails{how}",
    )


def _remote_points(plan: Plan, index: int) -> list[FailurePoint]:
    """A remote step's lost command and lost reply (if it has a timeout), and its command
    handled twice. A lost command or reply fails the step like an error does, and only the
    first attempt's of a retriable step."""
    s = plan.steps[index]
    if not s.remote:
        return []
    error = _error_point(plan, index)
    first = " (its first attempt)" if error.first_attempt_only else ""
    points = []
    if s.timeout:
        lost = {
            PointKind.TIMEOUT: f"{s.name}'s command is lost: it times out{first}",
            PointKind.NOREPLY: f"{s.name} acts, its reply is lost: it times out{first}",
        }
        points += [
            replace(error, id=f"{kind.value}@{s.name}", kind=kind, description=text)
            for kind, text in lost.items()
        ]
    points.append(
        FailurePoint(
            id=f"dup@{s.name}",
            kind=PointKind.DUP,
            step=s.name,
            expected=plan.end,
            description=f"{s.name}'s command is handled twice",
        )
    )
    return points


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
    remote = [p for i in range(len(plan.steps)) for p in _remote_points(plan, i)]
    return [clean, *errors, *undos, *remote, *crash_points(plan.writes, plan.end)]


def duplicate_compensations(
    points: Sequence[FailurePoint], remote: frozenset[str]
) -> list[FailurePoint]:
    """``points`` with a ``dup@undo:<step>`` point after the last non-crash point for each
    ``error@undo:<step>`` whose compensation is a command (a step in ``remote``): the same
    trigger fails, and the compensation's command is handled twice."""
    dups = [
        replace(
            p,
            id=f"dup@undo:{p.step}",
            kind=PointKind.DUP,
            expected=SagaState.FAILED,
            description=f"compensation of {p.step} is handled twice ({p.trigger} fails)",
        )
        for p in points
        if p.kind is PointKind.UNDO and p.step in remote
    ]
    at = next((i for i, p in enumerate(points) if p.kind is PointKind.CRASH), len(points))
    return [*points[:at], *dups, *points[at:]]


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
