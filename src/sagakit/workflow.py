"""What workflow code and step bodies see: WorkflowContext and StepContext."""

from __future__ import annotations

import math
import random as _random
import uuid as _uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sagakit.definition import Action, Compensation, RetryPolicy, kind_of
from sagakit.errors import ConfigurationError

if TYPE_CHECKING:
    from sagakit.engine import SagaRun


def _seconds(value: timedelta | float, what: str) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigurationError(f"{what} takes a timedelta or seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepContext:
    """Passed as ``ctx`` to every action and compensation.

    Attributes:
        saga_id: the saga's id.
        saga_type: the saga's type name.
        step: the step's name.
        attempt: 1 for the first attempt, 2 for the first retry, ...
        idempotency_key: ``"{saga_id}/{step}"`` for actions and
            ``"{saga_id}/{step}/compensate"`` for compensations; the same on every retry and
            after recovery. Hand it to the service so a re-run has no second effect.
        results: results of the steps completed before this one, by step name.
    """

    saga_id: str
    saga_type: str
    step: str
    attempt: int
    idempotency_key: str
    results: Mapping[str, Any]


def _qualname(fn: Any) -> str:
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


class WorkflowContext:
    """Passed as ``ctx`` to a code-first workflow ``async def fn(ctx, data)``.

    Everything a workflow does that is not deterministic goes through this object, so a
    replay after a crash takes the same path: steps return their recorded results, and
    ``now()``, ``uuid()`` and ``random()`` return their recorded values.
    """

    __slots__ = ("_run",)

    def __init__(self, run: SagaRun) -> None:
        self._run = run

    @property
    def saga_id(self) -> str:
        return self._run.saga_id

    @property
    def saga_type(self) -> str:
        return self._run.saga.name

    @property
    def results(self) -> Mapping[str, Any]:
        """Results of the steps completed so far, by step name."""
        return self._run.results

    async def step(
        self,
        action: Action,
        data: Any = None,
        *,
        name: str | None = None,
        compensate: Compensation | None = None,
        retry: RetryPolicy | None = None,
        compensate_retry: RetryPolicy | None = None,
        timeout: float | None = None,
        pivot: bool = False,
        retriable: bool = False,
    ) -> Any:
        """Run ``action(step_ctx, data)`` as a durable step and return its result.

        The result is committed to the journal before this returns; on replay the recorded
        result is returned without running ``action``. If the step fails for good,
        :class:`~sagakit.errors.StepFailed` is raised here; if the workflow lets it escape,
        the saga compensates its completed steps in reverse order. ``name`` defaults to the
        function's name (``name#2`` for its second call, and so on). ``timeout`` (seconds per
        attempt) holds across restarts: an attempt re-run after a crash keeps its deadline.
        ``pivot=True`` marks the point of no return and ``retriable=True`` a step after it,
        retried until it succeeds (see :class:`~sagakit.definition.StepKind`).
        """
        try:
            kind = kind_of(pivot=pivot, retriable=retriable)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        return await self._run.step(
            action,
            data,
            name=name or _qualname(action),
            compensate=compensate,
            retry=retry,
            compensate_retry=compensate_retry,
            timeout=timeout,
            kind=kind,
        )

    async def call(
        self,
        command: str,
        data: Any = None,
        *,
        name: str | None = None,
        compensate: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        compensate_retry: RetryPolicy | None = None,
        pivot: bool = False,
        retriable: bool = False,
    ) -> Any:
        """Run a remote step: send ``command`` (``"Service.Command"``) with ``data`` to its
        service and return the result of its reply. The saga waits for the reply unloaded;
        ``timeout`` (seconds per attempt) makes a missing reply a failed attempt.
        ``compensate`` names the command that undoes it. The App needs a broker
        (``App(broker=...)``); see :mod:`sagakit.remote`."""
        from sagakit.remote import Remote

        action = Remote(command)
        return await self.step(
            action,
            data,
            name=name or action.__name__,
            compensate=None if compensate is None else Remote(compensate),
            retry=retry,
            compensate_retry=compensate_retry,
            timeout=timeout,
            pivot=pivot,
            retriable=retriable,
        )

    async def sleep(self, duration: timedelta | float) -> None:
        """Wait durably for ``duration`` (a timedelta or seconds). The saga is unloaded while
        it sleeps and resumed by a worker when the time comes, also after restarts; it never
        wakes early (on PostgreSQL, by the database's clock)."""
        from sagakit import waits

        seconds = _seconds(duration, "sleep()")
        await waits.sleep(self._run, delay=seconds)

    async def sleep_until(self, when: datetime) -> None:
        """Wait durably until ``when`` (a timezone-aware datetime); see :meth:`sleep`."""
        if not isinstance(when, datetime) or when.tzinfo is None:
            raise ConfigurationError(
                f"sleep_until() needs a timezone-aware datetime, got {when!r}; "
                "use datetime.now(UTC) + timedelta(...)"
            )
        from sagakit import waits

        await waits.sleep(self._run, until=when.timestamp())

    async def wait_for_signal(
        self, name: str, *, timeout: timedelta | float | None = None, type: Any = None
    ) -> Any:
        """Wait durably for the signal ``name`` and return its payload (decoded as ``type``
        if given). A signal sent before the saga waits is kept and returned at once; each
        signal is returned once. Raises :class:`~sagakit.errors.SignalTimedOut` after
        ``timeout`` (a timedelta or seconds; None waits for ever). Send signals with
        ``await app.signal(saga_id, name, payload)`` or ``sagakit signal ID NAME JSON``."""
        _, payload = await self.wait_for_any_signal(name, timeout=timeout, type=type)
        return payload

    async def wait_for_any_signal(
        self, *names: str, timeout: timedelta | float | None = None, type: Any = None
    ) -> tuple[str, Any]:
        """Like :meth:`wait_for_signal`, for the first of several signals to arrive:
        ``name, payload = await ctx.wait_for_any_signal("approve", "reject", timeout=...)``."""
        for name in names:
            if not isinstance(name, str) or not name or name.startswith("sagakit.") or "|" in name:
                raise ConfigurationError(
                    "a signal name is a non-empty str without '|', not starting with "
                    f"'sagakit.', got {name!r}"
                )
        if not names:
            raise ConfigurationError("wait_for_any_signal() needs at least one signal name")
        from sagakit import waits

        seconds = None if timeout is None else _seconds(timeout, "wait_for_signal()")
        return await waits.wait_for_signal(self._run, names, seconds, type)

    async def parallel(self, *branches: Awaitable[Any]) -> list[Any]:
        """Run branches at once and return their results in order: ``a, b = await
        ctx.parallel(ctx.step(reserve, data), ctx.step(charge, data))``. Each branch is one
        ``ctx.step``, ``ctx.child``, ``ctx.sleep`` or ``ctx.wait_for_signal`` call.

        Every branch runs to its end. If one failed, its error is raised here, and if the
        workflow lets it escape, the completed steps of the group are compensated
        concurrently, then the earlier steps in reverse order."""
        from sagakit import waits

        return await waits.parallel(self._run, branches)

    async def child(self, saga_type: str, data: Any = None, *, name: str | None = None) -> Any:
        """Start a child saga of ``saga_type`` (once, whatever crashes happen) and return its
        output when it completes; :class:`~sagakit.errors.StepFailed` if it fails or is
        cancelled. The parent is unloaded while it waits. If the parent later compensates,
        the completed child is compensated along its own compensation path. ``name`` (the
        step's name, default the type) tells two children of one type apart."""
        from sagakit import children

        return await children.child(self._run, saga_type, data, name)

    def now(self) -> datetime:
        """The current UTC time, recorded so a replay sees the same value."""
        return datetime.fromisoformat(
            self._run.record_value(
                "now", lambda: datetime.fromtimestamp(self._run.clock.now(), UTC).isoformat()
            )
        )

    def uuid(self) -> _uuid.UUID:
        """A random UUID, recorded so a replay sees the same value."""
        return _uuid.UUID(self._run.record_value("uuid", lambda: str(_uuid.uuid4())))

    def random(self) -> float:
        """A random float in [0, 1), recorded so a replay sees the same value."""
        value: float = self._run.record_value("random", _random.random)
        return value
