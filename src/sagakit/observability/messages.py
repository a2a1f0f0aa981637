"""Trace context through broker messages, when OpenTelemetry is installed (else a no-op).

A remote step's command carries the W3C trace context of the saga run that sends it
(:func:`command_fields`), and the service handles it in a span whose parent is that context
(:func:`handler_span`): one trace from the orchestrator through every service.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from sagakit.messaging.envelope import Envelope


def command_fields() -> dict[str, str | None]:
    """``traceparent``/``tracestate`` of the current span for a command envelope; nothing
    without OpenTelemetry or outside a span."""
    try:
        from sagakit.observability.tracing import trace_fields
    except ImportError:
        return {}
    return {k: v for k, v in trace_fields().items() if v}


Failed = Callable[[BaseException], None]


def _unobserved(exc: BaseException) -> None:
    return None


@contextlib.contextmanager
def handler_span(command: Envelope, service: str, tracer_provider: Any = None) -> Iterator[Failed]:
    """A CONSUMER span ``handle <command type>`` around a service's handler, child of the
    trace context the command carries; nothing without OpenTelemetry. Yields a function to
    call with the handler's exception when it failed (the failure becomes a reply, not an
    exception through the span): it marks the span as an error and records the exception."""
    try:
        from opentelemetry import trace

        from sagakit.observability.tracing import extract
    except ImportError:
        yield _unobserved
        return
    tracer = trace.get_tracer("sagakit.service", tracer_provider=tracer_provider)
    attributes: dict[str, str | int] = {
        "messaging.message.id": command.message_id,
        "saga.id": command.correlation_id or "",
        "saga.step": command.headers.get("step", ""),
        "saga.attempt": int(command.headers.get("attempt", "1") or 1),
        "sagakit.service": service,
    }
    with tracer.start_as_current_span(
        f"handle {command.type}",
        context=extract(command),
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:

        def failed(exc: BaseException) -> None:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

        yield failed
