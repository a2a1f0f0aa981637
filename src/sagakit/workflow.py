"""What workflow code and step bodies see: WorkflowContext and StepContext."""

from __future__ import annotations

import random as _random
import uuid as _uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sagakit.definition import Action, Compensation, RetryPolicy

if TYPE_CHECKING:
    from sagakit.engine import SagaRun


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
    ) -> Any:
        """Run ``action(step_ctx, data)`` as a durable step and return its result.

        The result is committed to the journal before this returns; on replay the recorded
        result is returned without running ``action``. If the step fails for good,
        :class:`~sagakit.errors.StepFailed` is raised here; if the workflow lets it escape,
        the saga compensates its completed steps in reverse order. ``name`` defaults to the
        function's name (``name#2`` for its second call, and so on).
        """
        return await self._run.step(
            action,
            data,
            name=name or _qualname(action),
            compensate=compensate,
            retry=retry,
            compensate_retry=compensate_retry,
            timeout=timeout,
        )

    def now(self) -> datetime:
        """The current UTC time, recorded so a replay sees the same value."""
        return datetime.fromisoformat(
            self._run.record_value("now", lambda: datetime.now(UTC).isoformat())
        )

    def uuid(self) -> _uuid.UUID:
        """A random UUID, recorded so a replay sees the same value."""
        return _uuid.UUID(self._run.record_value("uuid", lambda: str(_uuid.uuid4())))

    def random(self) -> float:
        """A random float in [0, 1), recorded so a replay sees the same value."""
        value: float = self._run.record_value("random", _random.random)
        return value
