"""What the observability middleware needs from the proposed saga-level hook.

The engine has no per-saga middleware hook yet. ``LogContext``, ``Tracing`` and ``Metrics``
already implement ``saga(call, proceed)`` against this protocol, so that the hook, once the
engine wraps each run of ``SagaRun.execute()`` in it, lights them up without a change here.
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
