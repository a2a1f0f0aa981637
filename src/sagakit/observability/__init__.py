"""Observability as middleware: log fields, OpenTelemetry spans and Prometheus metrics.

``App(url, middleware=[LogContext(), Tracing(provider), Metrics()])``. Each piece is independent;
:mod:`.tracing` needs ``sagakit[otel]``, :mod:`.metrics` needs ``sagakit[metrics]``, and they are
imported only when used.

- :class:`LogContext` + :class:`SagaLogFilter`: ``%(saga_id)s``, ``%(saga_type)s``,
  ``%(step)s``, ``%(attempt)s`` in log formats (:mod:`.logs`).
- :class:`Tracing`: spans per step and compensation call, in one trace per saga
  (:mod:`.tracing`); :func:`trace_fields` / :func:`extract` carry context through messages.
- :class:`Metrics`: step latency, retries and compensations; saga counts by state,
  needs_attention and outbox lag from the store (:mod:`.metrics`).

Each also has a ``saga(call, proceed)`` method for a saga-level hook the engine does not call
yet (:mod:`.hooks`).
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
