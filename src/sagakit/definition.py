"""Saga definitions: steps, retry policies, and their validation. Pure: no I/O.

A :class:`Saga` is either a list of steps (declarative) or an async workflow function
(code-first). Declarative sagas compile to a workflow, so both run on one engine.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagakit.errors import DuplicateStepName, InvalidRetryPolicy, InvalidStep

if TYPE_CHECKING:
    from sagakit.workflow import WorkflowContext

Action = Callable[..., Any]
Compensation = Callable[..., Any]
Workflow = Callable[["WorkflowContext", Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how fast a step (or compensation) is retried.

    Args:
        max_attempts: total attempts, the first included (1 means no retry).
        initial_interval: seconds before the second attempt.
        backoff: multiplier of the interval after each attempt.
        max_interval: cap on any one interval, in seconds.
        jitter: fraction of each interval drawn at random (0.2 means ±20 %).
        retry_on: exception types that are retried; others fail the step at once. A name
            (``"ServiceUnavailable"``) matches an exception of that class name, and a remote
            step's failed reply whose handler raised that type (``RemoteStepFailed``).
        non_retryable: exception types (or names) never retried, even if they match
            ``retry_on``.
    """

    max_attempts: int = 3
    initial_interval: float = 0.1
    backoff: float = 2.0
    max_interval: float = 30.0
    jitter: float = 0.2
    retry_on: tuple[type[BaseException] | str, ...] = (Exception,)
    non_retryable: tuple[type[BaseException] | str, ...] = ()

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise InvalidRetryPolicy(f"max_attempts must be an int >= 1, got {attempts!r}")
        for name in ("initial_interval", "max_interval", "backoff", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                raise InvalidRetryPolicy(f"{name} must be a number, got {value!r}")
        if self.initial_interval < 0 or self.max_interval < 0:
            raise InvalidRetryPolicy("initial_interval and max_interval must be >= 0 seconds")
        if self.backoff < 1:
            raise InvalidRetryPolicy(f"backoff must be >= 1, got {self.backoff!r}")
        if not 0 <= self.jitter <= 1:
            raise InvalidRetryPolicy(f"jitter must be between 0 and 1, got {self.jitter!r}")
        for name in ("retry_on", "non_retryable"):
            types = getattr(self, name)
            if not isinstance(types, tuple):
                raise InvalidRetryPolicy(
                    f"{name} must be a tuple of exception types, e.g. (ValueError,); got {types!r}"
                )
            for t in types:
                if isinstance(t, str) and t.isidentifier():
                    continue
                if not (isinstance(t, type) and issubclass(t, BaseException)):
                    raise InvalidRetryPolicy(
                        f"{t!r} in {name} is not an exception type or an exception's name"
                    )

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed ``attempt`` (1-based) before the next one."""
        try:
            grown = self.initial_interval * self.backoff ** (attempt - 1)
        except OverflowError:
            grown = self.max_interval
        base = min(self.max_interval, grown)
        if self.jitter:
            base *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, min(base, self.max_interval))

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether failed ``attempt`` with ``exc`` is followed by another attempt."""
        if attempt >= self.max_attempts or _matches(exc, self.non_retryable):
            return False
        return _matches(exc, self.retry_on)


def _matches(exc: BaseException, kinds: tuple[type[BaseException] | str, ...]) -> bool:
    """Whether ``exc`` is one of ``kinds``: a class, or a name that is its class's or (for a
    remote step's failed reply) the remote handler's exception type."""
    names = {type(exc).__name__, getattr(exc, "error_type", None)}
    return any(k in names if isinstance(k, str) else isinstance(exc, k) for k in kinds)


NO_RETRY = RetryPolicy(max_attempts=1)
DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=5, initial_interval=0.1, max_interval=5.0)
FOREVER = 2**31 - 1  # the attempts of a retriable step: retried until it succeeds
RETRY_FOREVER = RetryPolicy(max_attempts=FOREVER, initial_interval=0.5, max_interval=60.0)


class StepKind(enum.StrEnum):
    """The kinds of saga transactions of *Microservices Patterns* (Richardson, ch. 4).

    A saga is a run of compensatable steps, then at most one pivot, then retriable steps:

    - ``compensatable``: undone by its compensation if a later step fails (a step without a
      compensation, such as a validation, is compensatable with nothing to undo);
    - ``pivot``: the point of no return. If it completes, the saga runs to the end; it has no
      compensation. If it fails, the steps before it are compensated;
    - ``retriable``: after the pivot; retried until it succeeds and never compensated. One that
      fails for good (a non-retryable error) parks the saga in ``needs_attention``.
    """

    COMPENSATABLE = "compensatable"
    PIVOT = "pivot"
    RETRIABLE = "retriable"


def kind_of(*, pivot: bool, retriable: bool) -> StepKind:
    if pivot and retriable:
        raise ValueError("a step is either the pivot or retriable, not both")
    if pivot:
        return StepKind.PIVOT
    return StepKind.RETRIABLE if retriable else StepKind.COMPENSATABLE


def retry_for(kind: StepKind, retry: RetryPolicy | None) -> RetryPolicy:
    """The retry policy a step of ``kind`` runs with: a retriable step keeps the given
    intervals but is never out of attempts."""
    if kind is StepKind.RETRIABLE:
        return dataclasses.replace(retry or RETRY_FOREVER, max_attempts=FOREVER)
    return retry or NO_RETRY


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One step of a declarative saga; build it with :func:`step`."""

    name: str
    action: Action
    compensate: Compensation | None = None
    retry: RetryPolicy = NO_RETRY
    compensate_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY
    timeout: float | None = None
    kind: StepKind = StepKind.COMPENSATABLE


@dataclass(frozen=True, slots=True)
class Parallel:
    """Steps of a declarative saga that run at the same time; build it with :func:`parallel`.

    The saga goes on when all of them completed. If one fails, the others still finish, and
    then the completed ones of the group (concurrently) and every earlier step (after them, in
    reverse order) are compensated.
    """

    steps: tuple[Step, ...]


def parallel(*steps: Step) -> Parallel:
    """Group steps to run concurrently: ``Saga("X", steps=[step(...), parallel(step(...),
    step(...)), step(...)])``."""
    return Parallel(steps=steps)


def check_callable(saga_type: str, name: str, fn: Any, role: str, params: int) -> None:
    """Raise :class:`InvalidStep` unless ``fn`` is callable with ``params`` positionals."""
    if not callable(fn):
        raise InvalidStep(saga_type, name, f"its {role} {fn!r} is not callable")
    try:
        inspect.signature(fn).bind(*range(params))
    except TypeError:
        raise InvalidStep(
            saga_type, name, f"its {role} {_name(fn)} must accept {params} positional arguments"
        ) from None
    except ValueError:
        pass  # builtins without a signature: trust them


def _name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or fn)


MAX_DEADLINE = 100 * 365 * 86_400.0  # a century: past any business process, short of year 9999


def deadline_problem(deadline: object) -> str | None:
    """Why ``deadline`` (seconds) is not a usable saga deadline, or None if it is."""
    if isinstance(deadline, bool) or not isinstance(deadline, int | float):
        return f"deadline must be a number of seconds, got {deadline!r}"
    if not 0 < deadline <= MAX_DEADLINE:  # also refuses NaN
        limit = f"{MAX_DEADLINE:.0f} seconds (a century)"
        return f"deadline must be > 0 and at most {limit}, got {deadline!r}"
    return None


def step(
    name: str,
    action: Action,
    *,
    compensate: Compensation | None = None,
    retry: RetryPolicy | None = None,
    compensate_retry: RetryPolicy | None = None,
    timeout: float | None = None,
    pivot: bool = False,
    retriable: bool = False,
) -> Step:
    """Declare a step: ``action(ctx, data) -> result`` and ``compensate(ctx, data, result)``.

    Either may be a plain function (run in a thread pool) or an ``async def``.
    ``timeout`` is seconds per attempt; a timed-out attempt counts as failed. ``pivot=True``
    marks the saga's point of no return and ``retriable=True`` a step after it that is retried
    until it succeeds (see :class:`StepKind`).
    """
    try:
        kind = kind_of(pivot=pivot, retriable=retriable)
    except ValueError as exc:
        raise InvalidStep("-", str(name), str(exc)) from None
    return Step(
        name=name,
        action=action,
        compensate=compensate,
        retry=retry_for(kind, retry),
        compensate_retry=compensate_retry or DEFAULT_COMPENSATION_RETRY,
        timeout=timeout,
        kind=kind,
    )


def validate_step(saga_type: str, s: Step) -> None:
    if not isinstance(s.name, str) or not s.name or "/" in s.name:
        raise InvalidStep(saga_type, str(s.name), "its name must be a non-empty string without '/'")
    check_callable(saga_type, s.name, s.action, "action", 2)
    if s.compensate is not None:
        check_callable(saga_type, s.name, s.compensate, "compensation", 3)
    if s.timeout is not None and (
        isinstance(s.timeout, bool) or not isinstance(s.timeout, int | float) or not s.timeout > 0
    ):
        raise InvalidStep(saga_type, s.name, f"timeout must be > 0 seconds, got {s.timeout!r}")
    for policy in (s.retry, s.compensate_retry):
        if not isinstance(policy, RetryPolicy):
            raise InvalidStep(saga_type, s.name, f"{policy!r} is not a RetryPolicy")
    if s.kind is not StepKind.COMPENSATABLE and s.compensate is not None:
        raise InvalidStep(
            saga_type,
            s.name,
            f"a {s.kind} step is never compensated, so it cannot have a compensation; "
            "drop compensate=, or make it an ordinary (compensatable) step before the pivot",
        )


def validate_kinds(saga_type: str, items: Sequence[Step | Parallel]) -> None:
    """Check the order compensatable* pivot? retriable*, with a message saying why not."""
    pivot: str | None = None
    retriable: str | None = None
    for item in items:
        group = item.steps if isinstance(item, Parallel) else (item,)
        for s in group:
            if s.kind is StepKind.PIVOT:
                if isinstance(item, Parallel):
                    raise InvalidStep(saga_type, s.name, "the pivot cannot be in a parallel "
                                      "group: it is the single point of no return")  # fmt: skip
                if pivot is not None:
                    raise InvalidStep(saga_type, s.name, f"the saga already has a pivot step "
                                      f"{pivot!r}; a saga has at most one")  # fmt: skip
                if retriable is not None:
                    raise InvalidStep(saga_type, s.name, f"the pivot must come before the "
                                      f"retriable step {retriable!r}")  # fmt: skip
            elif s.kind is StepKind.COMPENSATABLE and (pivot or retriable):
                after = f"the pivot {pivot!r}" if pivot else f"the retriable step {retriable!r}"
                raise InvalidStep(
                    saga_type,
                    s.name,
                    f"it comes after {after}, and steps after the point of no return are never "
                    "compensated; mark it retriable=True, or move it before the pivot",
                )
        for s in group:
            if s.kind is StepKind.PIVOT:
                pivot = s.name
            elif s.kind is StepKind.RETRIABLE:
                retriable = retriable or s.name


def flatten(items: Sequence[Step | Parallel]) -> Iterator[Step]:
    """Every step of a declarative saga, parallel groups opened up, in order."""
    for item in items:
        if isinstance(item, Parallel):
            yield from item.steps
        else:
            yield item


@dataclass(frozen=True, slots=True)
class Saga:
    """A saga definition.

    Declarative: ``Saga("OrderFulfillment", steps=[step(...), ...])``; each step's action gets
    the saga's input as ``data`` and the earlier results as ``ctx.results``; the saga's output is
    a dict of step name to result. Code-first: ``Saga("Name", workflow=fn)`` or ``@app.saga``.

    Args:
        name: the saga type, as passed to ``app.start``.
        steps: the steps, run in order; a :func:`parallel` group runs its steps at once.
        workflow: ``async def fn(ctx, data)``, instead of ``steps``.
        version: recorded with each saga started.
        deadline: seconds after start past which no further step starts and the saga
            compensates.
        max_in_flight: at most this many sagas of this type run at once across all workers
            (PostgreSQL) or in the one executing process (SQLite); the rest wait, started.
        max_in_flight_per_worker: at most this many at once in any one worker process.
    """

    name: str
    steps: Sequence[Step | Parallel] = ()
    workflow: Workflow | None = None
    version: int = 1
    deadline: float | None = None
    max_in_flight: int | None = None
    max_in_flight_per_worker: int | None = None
    input_type: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidStep(str(self.name), "-", "the saga name must be a non-empty string")
        if (self.workflow is None) == (not self.steps):
            raise InvalidStep(self.name, "-", "give either steps=[...] or workflow=fn, not both")
        for cap in ("max_in_flight", "max_in_flight_per_worker"):
            value = getattr(self, cap)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidStep(self.name, "-", f"{cap} must be an int >= 1, got {value!r}")
        if self.deadline is not None and (problem := deadline_problem(self.deadline)):
            raise InvalidStep(self.name, "-", problem)
        self._validate_steps()
        if self.workflow is not None:
            if not inspect.iscoroutinefunction(self.workflow):
                raise InvalidStep(self.name, "-", "a workflow must be an `async def fn(ctx, data)`")
            check_callable(self.name, "-", self.workflow, "workflow", 2)
            if self.input_type is None:
                object.__setattr__(self, "input_type", _input_hint(self.workflow))

    def _validate_steps(self) -> None:
        seen: set[str] = set()
        for item in self.steps:
            if isinstance(item, Parallel) and len(item.steps) < 2:
                raise InvalidStep(self.name, "-", "a parallel group needs at least two steps")
        for s in flatten(self.steps):
            if not isinstance(s, Step):
                raise InvalidStep(self.name, str(s), "steps must be built with sagakit.step(...)")
            validate_step(self.name, s)
            if s.name in seen:
                raise DuplicateStepName(self.name, s.name)
            seen.add(s.name)
        validate_kinds(self.name, self.steps)

    @property
    def capped(self) -> bool:
        """Whether sagas of this type run under a cap and so are started through a claim."""
        return self.max_in_flight is not None or self.max_in_flight_per_worker is not None

    def run(self) -> Workflow:
        """The workflow function that executes this saga."""
        return self.workflow or _compile(self.steps)


def _input_hint(fn: Workflow) -> Any:
    try:
        params = list(inspect.signature(fn, eval_str=True).parameters.values())
    except (NameError, TypeError):
        return None
    if len(params) >= 2 and params[1].annotation is not inspect.Parameter.empty:
        return params[1].annotation
    return None


def _compile(items: Sequence[Step | Parallel]) -> Workflow:
    def call(ctx: WorkflowContext, s: Step, data: Any) -> Awaitable[Any]:
        return ctx.step(
            s.action,
            data,
            name=s.name,
            compensate=s.compensate,
            retry=s.retry,
            compensate_retry=s.compensate_retry,
            timeout=s.timeout,
            pivot=s.kind is StepKind.PIVOT,
            retriable=s.kind is StepKind.RETRIABLE,
        )

    async def declarative(ctx: WorkflowContext, data: Any) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for item in items:
            if isinstance(item, Parallel):
                got = await ctx.parallel(*(call(ctx, s, data) for s in item.steps))
                results.update(zip((s.name for s in item.steps), got, strict=True))
            else:
                results[item.name] = await call(ctx, item, data)
        return results

    return declarative
