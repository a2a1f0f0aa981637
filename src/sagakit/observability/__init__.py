"""Observability as middleware: log fields, OpenTelemetry spans and Prometheus metrics.

``App(url, middleware=[LogContext(), Tracing(provider), Metrics()])``. Each piece is independent;
:mod:`.tracing` needs ``sagakit[otel]``, :mod:`.metrics` needs ``sagakit[metrics]``, and they are
imported only when used.

- :class:`LogContext` + :class:`SagaLogFilter`: ``%(saga_id)s``, ``%(saga_type)s``,
  ``%(step)s``, ``%(attempt)s`` in log formats (:mod:`.logs`).
- :class:`Tracing`: a span per saga run and per step and compensation call, in one trace per
  saga (:mod:`.tracing`); :func:`trace_fields` / :func:`extract` carry context through
  messages.
- :class:`Metrics`: step latency, retries and compensations; saga counts by state,
  needs_attention and outbox lag from the store (:mod:`.metrics`).

Each also implements the saga-level hook (``saga(call, proceed)``, :mod:`.hooks`): the worker
wraps every run of a saga in it.

**Remote steps are observed like local ones.** A remote attempt (a command to a service, see
:mod:`sagakit.remote`) passes through the middleware twice (:mod:`sagakit.middleware`): its
send through ``step`` and, in whichever run learns it (often a later one, maybe in another
process), its outcome through ``remote_done``. So:

- its log records carry ``step`` and ``attempt`` while the command is sent and while the
  reply (or the timeout) is recorded;
- its span ``saga step <name>`` (or ``saga compensation <name>``) runs from the send to the
  reply, is a child of the run span that sent the command and the parent of the service's
  handler span (the command carries its context), and has an error status if the service
  replied failed or the reply did not come in time;
- the step latency histogram observes send-to-reply time (outcome ``completed``, ``failed``
  or ``timed_out``), retries count the attempts sent after the first, and compensations count
  remote ones by outcome.

An attempt's outcome is observed once: a run that replays the saga finds it in the journal and
observes nothing again (only a crash between learning it and committing it makes the next run
observe it anew).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sagakit.observability.logs import LogContext, SagaLogFields, SagaLogFilter

if TYPE_CHECKING:
    from sagakit.observability.metrics import Metrics, exposition
    from sagakit.observability.tracing import Tracing, extract, inject, trace_fields

__all__ = [
    "LogContext",
    "Metrics",
    "SagaLogFields",
    "SagaLogFilter",
    "Tracing",
    "exposition",
    "extract",
    "inject",
    "trace_fields",
]

_LAZY = {
    "Metrics": "metrics",
    "exposition": "metrics",
    "Tracing": "tracing",
    "extract": "tracing",
    "inject": "tracing",
    "trace_fields": "tracing",
}


def __getattr__(name: str) -> Any:
    # Optional dependencies (opentelemetry, prometheus_client) load only when asked for.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
