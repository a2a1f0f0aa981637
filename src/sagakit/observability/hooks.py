"""What the observability middleware needs from the saga-level hook.

The worker wraps each run of a saga in ``Middleware.saga`` (:class:`sagakit.middleware.SagaCall`);
``LogContext``, ``Tracing`` and ``Metrics`` implement ``saga(call, proceed)`` against this
protocol, which asks only for the fields they read.
"""

from __future__ import annotations

import re
from typing import Protocol

__all__ = ["SagaRunCall", "step_label"]


class SagaRunCall(Protocol):
    """One run of a saga to its next resting or waiting state (read-only fields)."""

    @property
    def saga_id(self) -> str: ...

    @property
    def saga_type(self) -> str: ...


_REPEAT = re.compile(r"#\d+$")


def step_label(step: str) -> str:
    """The step's name without the engine's ``#2`` call counter (a workflow calling one step
    in a loop must not make a metric label per iteration)."""
    return _REPEAT.sub("", step)
