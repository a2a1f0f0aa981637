"""OpenTelemetry spans for sagas, steps and compensations, and W3C trace context for messages.

Spans are made by a tracer of the application's own provider (``Tracing(tracer_provider=p)``)
or of the global one (``Tracing()``); sagakit never installs or replaces a provider.

**One trace per saga.** A saga outlives processes: it may run its first step today in one
worker and its compensation next week in another. Its trace id and a root span id are therefore
derived from the saga id (:func:`saga_span_context`), so every span of the saga, in any process
and after any restart, lands in the same trace under the same parent. No span is ever
exported *with* that root id (a backend shows the root as missing or synthesised); each run of
the saga gets a real ``saga <type>`` span under it (the saga hook, which the worker calls), and
step spans hang below that run span.

**Remote steps.** A remote attempt's span (``saga step <name>`` or ``saga compensation
<name>``, kind CLIENT) covers the time from its command's send to its reply, and is a child of
the run span that sent it. It cannot be made at the send: the reply may come to another run,
in another process. So its span id is derived from the command's id (:func:`remote_span_id`),
and the command is made in that span's context, with the sending run span's id in the W3C
``tracestate`` (``sagakit=<span id>``): the service's handler span is its child, and whichever
run learns the outcome emits the span with that id, that parent, the send as its start and
the reply as its end, its status set from the outcome. Choosing a span id needs the
OpenTelemetry SDK's tracer: :class:`Tracing` wraps the ``id_generator`` of the provider's
``sagakit`` tracer, and the wrapper changes nothing for any span but these. Another tracer
gets a span of its own id, *linked* to the context the command carried.

The root context is marked *sampled*: a ``ParentBased`` sampler keeps every saga's spans. Give
the provider a non-parent-based sampler to sample sagas by other means.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sagakit.messaging.envelope import Envelope
from sagakit.middleware import Middleware, Proceed, RemoteDone, StepCall
from sagakit.observability.hooks import SagaRunCall, step_label
from sagakit.remote import command_id

__all__ = [
    "Tracing",
    "extract",
    "inject",
    "remote_span_id",
    "saga_span_context",
    "trace_fields",
]

_W3C = TraceContextTextMapPropagator()
_SENDER = "sagakit"  # tracestate key: the span id of the run that sent a remote command
# The span id the next span started in this context gets (see _ChosenSpanIds).
_CHOSEN: ContextVar[int | None] = ContextVar("sagakit_chosen_span_id", default=None)


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


def remote_span_id(message_id: str) -> int:
    """The span id of the remote attempt that sends command ``message_id``: fixed, so that the
    run that learns its outcome, wherever it runs, emits the span its service's handler span
    names as its parent."""
    digest = hashlib.sha256(b"sagakit-span/" + message_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") or 1


def _saga_root(saga_id: str) -> Context:
    return trace.set_span_in_context(trace.NonRecordingSpan(saga_span_context(saga_id)))


class Tracing(Middleware):
    """Middleware making a span per step call (``saga step <name>``) and per compensation call
    (``saga compensation <name>``), and per saga run (``saga <type>``) through the saga hook.
    A remote step's or compensation's attempt gets one span from its command's send to its
    reply, emitted when the reply (or the timeout) is journaled (see the module).

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
        if call.remote:
            return await self._send(call, proceed)
        with self.tracer.start_as_current_span(
            _span_name(call),
            context=self._parent(call.saga_id),
            kind=SpanKind.INTERNAL,
            attributes=_attributes(call),
        ) as span:
            return await _traced(span, proceed)

    async def _send(self, call: StepCall, proceed: Proceed) -> Any:
        """A remote attempt's send: no span yet (see the module), but the command is made in
        the context of the span to come, which names its parent in the tracestate."""
        parent = trace.get_current_span(self._parent(call.saga_id)).get_span_context()
        state = parent.trace_state
        sender = f"{parent.span_id:016x}"
        state = state.update(_SENDER, sender) if _SENDER in state else state.add(_SENDER, sender)
        mid = command_id(call.saga_id, call.step, call.attempt, compensation=call.compensation)
        sending = trace.SpanContext(
            trace_id=parent.trace_id,
            span_id=remote_span_id(mid),
            is_remote=False,
            trace_flags=parent.trace_flags,
            trace_state=state,
        )
        with trace.use_span(trace.NonRecordingSpan(sending)):
            return await proceed()

    async def remote_done(self, done: RemoteDone, proceed: Proceed) -> Any:
        """The span of a remote attempt, emitted once its outcome is journaled."""
        result = await proceed()
        self._remote_span(done)
        return result

    def _remote_span(self, done: RemoteDone) -> None:
        call = done.call
        fields = {"traceparent": done.traceparent, "tracestate": done.tracestate}
        carried = {k: v for k, v in fields.items() if v}
        sent = trace.get_current_span(_W3C.extract(carried)).get_span_context()
        parent, span_id = _sender(sent)
        tracer = self._remote_tracer()
        links: list[Link] = []
        if parent is None or not _can_choose(tracer):
            parent, span_id = self._parent(call.saga_id), None
            links = [Link(sent)] if sent.is_valid else []
        attributes = {**_attributes(call), "saga.command": call.command or "",
                      "saga.outcome": done.outcome}  # fmt: skip
        token = _CHOSEN.set(span_id)
        try:
            span = tracer.start_span(_span_name(call), context=parent, kind=SpanKind.CLIENT,
                                     attributes=attributes, links=links,
                                     start_time=_ns(done.sent_at))  # fmt: skip
        finally:
            _CHOSEN.reset(token)
        if done.error is not None:
            span.record_exception(done.error, timestamp=_ns(done.done_at))
            description = f"{type(done.error).__name__}: {done.error}"
            span.set_status(Status(StatusCode.ERROR, description))
        span.end(end_time=_ns(done.done_at))

    def _remote_tracer(self) -> trace.Tracer:
        if isinstance(self.tracer, trace.ProxyTracer):  # the global provider, looked up now
            return trace.get_tracer("sagakit", _version())
        return self.tracer

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


def _span_name(call: StepCall) -> str:
    what = "compensation" if call.compensation else "step"
    return f"saga {what} {step_label(call.step)}"


def _attributes(call: StepCall) -> dict[str, Any]:
    return {
        "saga.id": call.saga_id,
        "saga.type": call.saga_type,
        "saga.step": call.step,
        "saga.step.name": step_label(call.step),
        "saga.attempt": call.attempt,
        "saga.compensation": call.compensation,
        "saga.step.kind": str(call.kind.value),
    }


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _sender(sent: trace.SpanContext) -> tuple[Context | None, int | None]:
    """For the context a remote command carried: the context of the run span that sent it
    and the span id of the attempt's span, if :meth:`Tracing._send` made it (else None)."""
    sender = sent.trace_state.get(_SENDER) if sent.is_valid else None
    try:
        span_id = int(sender or "", 16)
    except ValueError:
        return None, None
    run = trace.SpanContext(
        trace_id=sent.trace_id,
        span_id=span_id,
        is_remote=True,
        trace_flags=sent.trace_flags,
        trace_state=sent.trace_state.delete(_SENDER),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(run)), sent.span_id


class _ChosenSpanIds:
    """A tracer's id generator, except that the span started while ``_CHOSEN`` holds an id
    gets that id."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def generate_span_id(self) -> int:
        chosen = _CHOSEN.get()
        return int(self.inner.generate_span_id()) if chosen is None else chosen

    def __getattr__(self, name: str) -> Any:  # generate_trace_id and whatever comes later
        return getattr(self.inner, name)


def _can_choose(tracer: trace.Tracer) -> bool:
    """Whether spans of ``tracer`` can be given an id (an SDK tracer, whose id generator is
    then wrapped: the wrapper changes nothing for spans started outside ``_CHOSEN``)."""
    generator = getattr(tracer, "id_generator", None)
    if generator is None or not callable(getattr(generator, "generate_span_id", None)):
        return False
    if not isinstance(generator, _ChosenSpanIds):
        tracer.id_generator = _ChosenSpanIds(generator)  # type: ignore[attr-defined]
    return True


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
