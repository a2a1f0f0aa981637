"""OpenTelemetry spans for sagas, steps and compensations, and W3C trace context for messages.

Spans are made by a tracer of the application's own provider (``Tracing(tracer_provider=p)``)
or of the global one (``Tracing()``); sagakit never installs or replaces a provider.

**One trace per saga.** A saga outlives processes: it may run its first step today in one
worker and its compensation next week in another. Its trace id and a root span id are therefore
derived from the saga id (:func:`saga_span_context`), so every span of the saga, in any process
and after any restart, lands in the same trace under the same parent. No span is ever
exported *with* that root id (a backend shows the root as missing or synthesised); each run of
the saga gets a real ``saga <type>`` span under it once the engine calls the saga hook (see
:mod:`sagakit.observability.hooks`), and step spans then hang below that run span.

The root context is marked *sampled*: a ``ParentBased`` sampler keeps every saga's spans. Give
the provider a non-parent-based sampler to sample sagas by other means.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sagakit.messaging.envelope import Envelope
from sagakit.middleware import Middleware, Proceed, StepCall
from sagakit.observability.hooks import SagaRunCall, step_label

__all__ = [
    "Tracing",
    "extract",
    "inject",
    "saga_span_context",
    "trace_fields",
]

_W3C = TraceContextTextMapPropagator()


def _version() -> str | None:
    try:
        return importlib.metadata.version("sagakit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return None


def saga_span_context(saga_id: str) -> trace.SpanContext:
    """The deterministic (remote, sampled) root of saga ``saga_id``'s trace."""
    digest = hashlib.sha256(b"sagakit-trace/" + saga_id.encode()).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1  # 0 is the invalid id
    span_id = int.from_bytes(digest[16:24], "big") or 1
    return trace.SpanContext(
        trace_id=trace_id,
        span_id=span_id,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )


def _saga_root(saga_id: str) -> Context:
    return trace.set_span_in_context(trace.NonRecordingSpan(saga_span_context(saga_id)))


class Tracing(Middleware):
    """Middleware making a span per step call (``saga step <name>``) and per compensation call
    (``saga compensation <name>``), and per saga run (``saga <type>``) through the saga hook.

    Args:
        tracer_provider: the provider to take the tracer from; None for the global one, looked
            up when spans are made (so a provider set after the App is built is used).
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer("sagakit", _version(), tracer_provider=tracer_provider)

    def _parent(self, saga_id: str) -> Context | None:
        """The current span if it belongs to this saga's trace (its run span), else the saga's
        deterministic root."""
        current = trace.get_current_span().get_span_context()
        if current.is_valid and current.trace_id == saga_span_context(saga_id).trace_id:
            return None  # the current context, as is
        return _saga_root(saga_id)

    async def step(self, call: StepCall, proceed: Proceed) -> Any:
        what = "compensation" if call.compensation else "step"
        attributes: dict[str, Any] = {
            "saga.id": call.saga_id,
            "saga.type": call.saga_type,
            "saga.step": call.step,
            "saga.step.name": step_label(call.step),
            "saga.attempt": call.attempt,
            "saga.compensation": call.compensation,
            "saga.step.kind": str(call.kind.value),
        }
        with self.tracer.start_as_current_span(
            f"saga {what} {step_label(call.step)}",
            context=self._parent(call.saga_id),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
        ) as span:
            return await _traced(span, proceed)

    async def saga(self, call: SagaRunCall, proceed: Proceed) -> Any:
        """The saga-level hook: one span per run of the saga, child of its root."""
        with self.tracer.start_as_current_span(
            f"saga {call.saga_type}",
            context=_saga_root(call.saga_id),
            kind=SpanKind.INTERNAL,
            attributes={"saga.id": call.saga_id, "saga.type": call.saga_type},
        ) as span:
            state = await _traced(span, proceed)
            span.set_attribute("saga.state", str(getattr(state, "value", state)))
            return state


async def _traced(span: trace.Span, proceed: Proceed) -> Any:
    # start_as_current_span records an Exception itself; a cancellation (a step timeout is a
    # cancellation of the call) is a BaseException it would leave with an unset status.
    try:
        return await proceed()
    except Exception:
        raise
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise


def inject(
    carrier: MutableMapping[str, str] | None = None, *, context: Context | None = None
) -> MutableMapping[str, str]:
    """Write the current (or ``context``'s) trace context into ``carrier`` (a new dict if
    None) with the application's global propagator, and return it: for message headers."""
    target: MutableMapping[str, str] = {} if carrier is None else carrier
    propagate.inject(target, context=context)
    return target


def trace_fields(context: Context | None = None) -> dict[str, str | None]:
    """``traceparent`` and ``tracestate`` of the current (or ``context``'s) span, as
    :class:`~sagakit.messaging.envelope.Envelope` fields: ``Envelope.new(..., **trace_fields())``.

    These fields are W3C by name, so the W3C propagator fills them whatever global propagator
    the application configured."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=context)
    return {"traceparent": carrier.get("traceparent"), "tracestate": carrier.get("tracestate")}


def extract(envelope: Envelope, *, context: Context | None = None) -> Context:
    """The trace context a message carries (its W3C fields, then any propagator headers), on
    top of ``context`` (the current one if None): the parent for the receiver's spans."""
    ctx = propagate.extract(_headers(envelope.headers), context=context)
    fields = {
        k: v
        for k, v in (("traceparent", envelope.traceparent), ("tracestate", envelope.tracestate))
        if v
    }
    return _W3C.extract(fields, context=ctx) if fields else ctx


def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}
