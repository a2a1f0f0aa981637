"""Middleware: code that wraps every step and compensation call the engine makes.

Give an App a list (``App(url, middleware=[Timing()])``); the first wraps all the others. A
middleware sees one :class:`StepCall` per call and decides when (and whether) to ``proceed``.
sagakit's own failure injection (:mod:`sagakit.testing`) is a middleware.

**Remote steps** (a command to a service, :mod:`sagakit.remote`) pass through the same hooks,
split in two because their outcome comes later, often in another run of the saga or in another
process:

1. :meth:`Middleware.step` wraps the *send* of each attempt. The :class:`StepCall` has
   ``command`` set (``call.remote`` is True); ``proceed()`` writes the command to the outbox,
   with the journal entry that starts the attempt, and returns None, not the step's result.
   Context the middleware sets around ``proceed()`` (log fields, the current span) is what
   the command is made in: its trace context is the one the service's handler continues.
2. :meth:`Middleware.remote_done` wraps the engine's recording of the attempt's outcome (the
   service replied, or the reply did not come in time), in whichever run learns it. Its
   :class:`RemoteDone` carries the same call, the outcome, when the command was sent and when
   the outcome came, and the trace context the command carried.

A middleware that raises in ``step`` before proceeding fails the attempt, reported as
``failed``; once ``proceed()`` has run the command is gone and only its reply decides (a
later exception is logged), and one that returns without proceeding does not stop the send.

An outcome is reported once: a later run that replays the saga finds it in the journal and
reports nothing. Only a crash between learning an outcome and committing it (a completed
attempt's entry is committed with the next write) reports it again when the next run learns
it anew, as a local step's body runs again after such a crash.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sagakit.definition import StepKind

Proceed = Callable[[], Awaitable[Any]]
Outcome = Literal["completed", "failed", "timed_out"]


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
        command: for a remote step, the command sent (``"Service.Command"``): the call is the
            send, its outcome comes to :meth:`Middleware.remote_done`. None for a local call.
    """

    saga_id: str
    saga_type: str
    step: str
    attempt: int
    compensation: bool
    data: Any
    result: Any = None
    kind: StepKind = StepKind.COMPENSATABLE
    command: str | None = None

    @property
    def remote(self) -> bool:
        """Whether this is the send of a remote step's command."""
        return self.command is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteDone:
    """How one attempt of a remote action or compensation ended: the input of
    :meth:`Middleware.remote_done`.

    Attributes:
        call: the attempt, as its send passed through :meth:`Middleware.step`.
        outcome: ``"completed"``, ``"failed"`` (the service replied failed, or a middleware
            failed the send) or ``"timed_out"`` (no reply within the step's timeout).
        error: what the attempt failed with (:class:`~sagakit.remote.RemoteStepFailed`,
            :class:`~sagakit.errors.StepTimedOut`, ...); None if it completed.
        sent_at: when the command was written to the outbox (seconds since the epoch, the
            engine's clock).
        done_at: when the reply was stored, or when the engine found the attempt timed out.
        traceparent, tracestate: the W3C trace context the command carried (None if it
            carried none).
    """

    call: StepCall
    outcome: Outcome
    error: BaseException | None = None
    sent_at: float
    done_at: float
    traceparent: str | None = None
    tracestate: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaCall:
    """One run of a saga in this process (from its start or resumption to its next rest or
    wait): the input of :meth:`Middleware.saga`."""

    saga_id: str
    saga_type: str
    version: int


class Middleware:
    """Base class: override :meth:`step`, :meth:`remote_done` and/or :meth:`saga`; the
    defaults just proceed."""

    async def step(self, call: StepCall, proceed: Proceed) -> Any:
        """Wrap one call: return ``await proceed()`` (its result), raise to fail the call.
        For a remote step (``call.remote``) this is the send of the command: raising fails
        the attempt as a failed reply would."""
        return await proceed()

    async def remote_done(self, done: RemoteDone, proceed: Proceed) -> Any:
        """Wrap the recording of a remote attempt's outcome: ``await proceed()`` journals it.
        The outcome is the service's: a middleware cannot change it, and an exception raised
        here is logged and ignored (the outcome is recorded all the same)."""
        return await proceed()

    async def saga(self, call: SagaCall, proceed: Proceed) -> Any:
        """Wrap one run of a saga; ``await proceed()`` returns the state it came to rest in."""
        return await proceed()


def chain(middleware: Sequence[Middleware], call: StepCall, body: Proceed) -> Proceed:
    """``body`` wrapped by every middleware, the first outermost."""
    return _chain([m.step for m in middleware], call, body)


def chain_remote_done(middleware: Sequence[Middleware], done: RemoteDone, body: Proceed) -> Proceed:
    """``body`` (recording a remote outcome) wrapped by every :meth:`Middleware.remote_done`."""
    return _chain([m.remote_done for m in middleware], done, body)


def chain_saga(middleware: Sequence[Middleware], call: SagaCall, body: Proceed) -> Proceed:
    """``body`` (a saga run) wrapped by every middleware's :meth:`Middleware.saga`."""
    return _chain([m.saga for m in middleware], call, body)


def _chain(
    hooks: Sequence[Callable[[Any, Proceed], Awaitable[Any]]], call: Any, body: Proceed
) -> Proceed:
    proceed = body
    for hook in reversed(hooks):
        proceed = functools.partial(hook, call, proceed)
    return proceed
