"""Saga context on log records: ``saga_id``, ``saga_type``, ``step`` and ``attempt``.

:class:`LogContext` (a middleware) sets them while a step or compensation runs (for a remote
step: while its command is sent, and while the engine records the reply or timeout);
:class:`SagaLogFilter` copies them onto every record that passes a handler, ``None`` outside
a saga, so a format string may always name them::

    handler = logging.StreamHandler()
    handler.addFilter(SagaLogFilter())
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s [%(saga_type)s %(saga_id)s %(step)s#%(attempt)s] %(message)s"
    ))
    app = App(url, middleware=[LogContext()])

Put the filter on the handler, not on a logger: a logger's filters do not see records that
propagate from its children (``sagakit.engine``, your service's loggers, ...).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sagakit.middleware import Middleware, Proceed, RemoteDone, StepCall

__all__ = ["LogContext", "SagaLogFields", "SagaLogFilter", "current"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaLogFields:
    """The saga a log record was written in; a field is None when it is not known."""

    saga_id: str | None = None
    saga_type: str | None = None
    step: str | None = None
    attempt: int | None = None


_NONE = SagaLogFields()
# One variable holding one immutable value: set and reset together, never half-updated.
_current: ContextVar[SagaLogFields] = ContextVar("sagakit_log_fields", default=_NONE)


def current() -> SagaLogFields:
    """The saga fields of the running code (all None outside a saga)."""
    return _current.get()


class LogContext(Middleware):
    """Middleware that makes the saga, step and attempt of each call visible to logging.

    The fields are context variables: code awaited by an ``async`` step sees them, and so do
    threads that copy the context. (A plain function run by the engine's thread pool sees them
    only if the engine copies the context into the thread.)
    """

    async def step(self, call: StepCall, proceed: Proceed) -> Any:
        token = _current.set(_fields(call))
        try:
            return await proceed()
        finally:
            _current.reset(token)

    async def remote_done(self, done: RemoteDone, proceed: Proceed) -> Any:
        """The fields of a remote attempt while the engine records its outcome (its retry or
        failure is logged then)."""
        token = _current.set(_fields(done.call))
        try:
            return await proceed()
        finally:
            _current.reset(token)

    async def saga(self, call: Any, proceed: Proceed) -> Any:
        """The saga-level hook (see the observability package docstring): saga id and type
        around one run of a saga, so the engine's own records carry them too."""
        token = _current.set(SagaLogFields(saga_id=call.saga_id, saga_type=call.saga_type))
        try:
            return await proceed()
        finally:
            _current.reset(token)


def _fields(call: StepCall) -> SagaLogFields:
    return SagaLogFields(
        saga_id=call.saga_id, saga_type=call.saga_type, step=call.step, attempt=call.attempt
    )


class SagaLogFilter(logging.Filter):
    """Adds ``saga_id``, ``saga_type``, ``step`` and ``attempt`` to every record (None outside
    a saga); never drops a record. Fields a record already has (``extra=``) are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _current.get()
        for name in ("saga_id", "saga_type", "step", "attempt"):
            if not hasattr(record, name):
                setattr(record, name, getattr(fields, name))
        return True
