"""Middleware: code that wraps every step and compensation call the engine makes.

Give an App a list (``App(url, middleware=[Timing()])``); the first wraps all the others. A
middleware sees one :class:`StepCall` per call and decides when (and whether) to ``proceed``.
sagakit's own failure injection (:mod:`sagakit.testing`) is a middleware.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sagakit.definition import StepKind

Proceed = Callable[[], Awaitable[Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class StepCall:
    """One call of a step's action or compensation.

    Attributes:
        saga_id, saga_type: the saga.
        step: the step's name (``name#2`` for its second call in a workflow).
        attempt: 1 for the first attempt.
        compensation: True when the compensation is called, False for the action.
        data: the step's input.
        result: for a compensation, the result of the step it undoes.
        kind: the step's kind (compensatable, pivot or retriable).
    """

    saga_id: str
    saga_type: str
    step: str
    attempt: int
    compensation: bool
    data: Any
    result: Any = None
    kind: StepKind = StepKind.COMPENSATABLE


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaCall:
    """One run of a saga in this process (from its start or resumption to its next rest or
    wait): the input of :meth:`Middleware.saga`."""

    saga_id: str
    saga_type: str
    version: int


class Middleware:
    """Base class: override :meth:`step` and/or :meth:`saga`; the defaults just proceed."""

    async def step(self, call: StepCall, proceed: Proceed) -> Any:
        """Wrap one call: return ``await proceed()`` (its result), raise to fail the call."""
        return await proceed()

    async def saga(self, call: SagaCall, proceed: Proceed) -> Any:
        """Wrap one run of a saga; ``await proceed()`` returns the state it came to rest in."""
        return await proceed()


def chain(middleware: Sequence[Middleware], call: StepCall, body: Proceed) -> Proceed:
    """``body`` wrapped by every middleware, the first outermost."""
    proceed = body
    for m in reversed(middleware):
        proceed = _bind(m, call, proceed)
    return proceed


def chain_saga(middleware: Sequence[Middleware], call: SagaCall, body: Proceed) -> Proceed:
    """``body`` (a saga run) wrapped by every middleware's :meth:`Middleware.saga`."""
    proceed = body
    for m in reversed(middleware):
        proceed = _bind_saga(m, call, proceed)
    return proceed


def _bind_saga(m: Middleware, call: SagaCall, inner: Proceed) -> Proceed:
    async def wrapped() -> Any:
        return await m.saga(call, inner)

    return wrapped


def _bind(m: Middleware, call: StepCall, inner: Proceed) -> Proceed:
    async def wrapped() -> Any:
        return await m.step(call, inner)

    return wrapped
