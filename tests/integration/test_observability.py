"""Observability middleware on a real SQLite App: log fields, spans, Prometheus metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from sagakit import App, RetryPolicy, Saga, SagaFailed, step
from sagakit.messaging.envelope import Envelope
from sagakit.middleware import StepCall
from sagakit.observability import LogContext, Metrics, SagaLogFilter, Tracing
from sagakit.observability.tracing import extract, inject, saga_span_context, trace_fields

steps_log = logging.getLogger("tests.observability.steps")
RETRY = RetryPolicy(max_attempts=2, initial_interval=0.001, jitter=0)


def order_saga(name: str, *, fail_at: str | None = None) -> Saga:
    """reserve / charge (fails once, then succeeds) / ship; each compensatable and logging."""
    flaky: set[str] = set()

    def make(step_name: str) -> Any:
        async def action(ctx: Any, data: Any) -> dict[str, Any]:
            steps_log.info("running %s", step_name)
            if step_name == "charge" and ctx.saga_id not in flaky:
                flaky.add(ctx.saga_id)
                raise ConnectionError("payments hiccup")
            if step_name == fail_at:
                raise RuntimeError(f"{step_name} is down")
            return {"done": step_name}

        async def undo(ctx: Any, data: Any, result: Any) -> None:
            steps_log.info("undoing %s", step_name)

        return step(step_name, action, compensate=undo, retry=RETRY)

    return Saga(name, steps=[make(s) for s in ("reserve", "charge", "ship")])


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    provider = TracerProvider()  # the application's own provider, never made global
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
async def observed(
    tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> AsyncIterator[tuple[App, Metrics, list[str]]]:
    """An App with all three middleware that ran one completed and one compensated saga."""
    metrics = Metrics()
    app = App(
        f"sqlite:///{tmp_path / 'sagas.db'}",
        poll_interval=0.05,
        middleware=[LogContext(), Tracing(tracer_provider=spans[0]), metrics],
    )
    app.register(order_saga("Order"))
    app.register(order_saga("DoomedOrder", fail_at="ship"))
    try:
        ok = await app.start("Order", {"order": "A-1"})
        await ok.result(timeout=5)
        doomed = await app.start("DoomedOrder", {"order": "A-2"})
        with pytest.raises(SagaFailed):
            await doomed.result(timeout=5)
        yield app, metrics, [ok.id, doomed.id]
    finally:
        await app.close()


# -- logs --------------------------------------------------------------------------------------


@pytest.fixture
def saga_caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    saga_filter = SagaLogFilter()
    caplog.handler.addFilter(saga_filter)
    caplog.set_level(logging.INFO, logger=steps_log.name)
    yield caplog
    caplog.handler.removeFilter(saga_filter)


async def test_log_records_carry_saga_step_and_attempt(
    saga_caplog: pytest.LogCaptureFixture, spans: Any, tmp_path: Path
) -> None:
    app = App(f"sqlite:///{tmp_path / 'sagas.db'}", poll_interval=0.05, middleware=[LogContext()])
    app.register(order_saga("DoomedOrder", fail_at="ship"))
    try:
        handle = await app.start("DoomedOrder", {"order": "A-2"})
        with pytest.raises(SagaFailed):
            await handle.result(timeout=5)
        steps_log.info("outside any saga")
    finally:
        await app.close()

    seen = [
        (r.getMessage(), r.saga_id, r.saga_type, r.step, r.attempt)  # type: ignore[attr-defined]
        for r in saga_caplog.records
        if r.name == steps_log.name
    ]
    assert seen == [
        ("running reserve", handle.id, "DoomedOrder", "reserve", 1),
        ("running charge", handle.id, "DoomedOrder", "charge", 1),
        ("running charge", handle.id, "DoomedOrder", "charge", 2),
        ("running ship", handle.id, "DoomedOrder", "ship", 1),
        ("running ship", handle.id, "DoomedOrder", "ship", 2),
        ("undoing charge", handle.id, "DoomedOrder", "charge", 1),
        ("undoing reserve", handle.id, "DoomedOrder", "reserve", 1),
        ("outside any saga", None, None, None, None),
    ]
    formatted = logging.Formatter("%(saga_id)s %(step)s#%(attempt)s %(message)s")
    assert formatted.format(saga_caplog.records[0]) == f"{handle.id} reserve#1 running reserve"


async def test_sync_step_bodies_see_the_log_fields(
    saga_caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    def reserve(ctx: Any, data: Any) -> None:
        steps_log.info("sync step")

    app = App(f"sqlite:///{tmp_path / 'sagas.db'}", poll_interval=0.05, middleware=[LogContext()])
    app.register(Saga("Sync", steps=[step("reserve", reserve)]))
    try:
        handle = await app.start("Sync", {})
        await handle.result(timeout=5)
    finally:
        await app.close()
    (record,) = [r for r in saga_caplog.records if r.name == steps_log.name]
    assert record.saga_id == handle.id  # type: ignore[attr-defined]


# -- tracing -----------------------------------------------------------------------------------


def _by_saga(exporter: InMemorySpanExporter, saga_id: str) -> list[ReadableSpan]:
    """The step and compensation spans of a saga (its run spans apart: see _runs)."""
    return sorted(_runs(exporter, saga_id, runs=False), key=lambda s: s.start_time or 0)


def _runs(exporter: InMemorySpanExporter, saga_id: str, *, runs: bool = True) -> list[ReadableSpan]:
    """The saga's run spans (``runs``), or all its other spans."""
    return [
        s
        for s in exporter.get_finished_spans()
        if (s.attributes or {}).get("saga.id") == saga_id
        and s.name.startswith(("saga step ", "saga compensation ")) is not runs
    ]


async def test_spans_per_step_and_compensation_in_one_trace_per_saga(
    observed: tuple[App, Metrics, list[str]], spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    _, _, (ok_id, doomed_id) = observed
    exporter = spans[1]

    ok = _by_saga(exporter, ok_id)
    assert [(s.name, (s.attributes or {})["saga.attempt"]) for s in ok] == [
        ("saga step reserve", 1),
        ("saga step charge", 1),
        ("saga step charge", 2),
        ("saga step ship", 1),
    ]
    doomed = _by_saga(exporter, doomed_id)
    assert [s.name for s in doomed] == [
        "saga step reserve",
        "saga step charge",
        "saga step charge",
        "saga step ship",
        "saga step ship",
        "saga compensation charge",
        "saga compensation reserve",
    ]
    undo = doomed[-1]
    assert dict(undo.attributes or {}) == {
        "saga.id": doomed_id,
        "saga.type": "DoomedOrder",
        "saga.step": "reserve",
        "saga.step.name": "reserve",
        "saga.attempt": 1,
        "saga.compensation": True,
        "saga.step.kind": "compensatable",
    }

    for saga_id, found in ((ok_id, ok), (doomed_id, doomed)):
        root = saga_span_context(saga_id)
        # Each run of the saga (the engine's saga hook) is a child of the saga's fixed root,
        # and the steps of the run are children of the run.
        run_ids = set()
        for r in _runs(exporter, saga_id):
            assert r.context is not None
            assert r.parent is not None
            assert (r.parent.span_id, r.parent.is_remote) == (root.span_id, True)
            run_ids.add(r.context.span_id)
        assert run_ids, "a run span per saga run"
        for s in found:
            assert s.context is not None
            assert s.parent is not None
            assert s.context.trace_id == root.trace_id, "one trace per saga"
            assert s.parent.span_id in run_ids
    assert saga_span_context(ok_id).trace_id != saga_span_context(doomed_id).trace_id

    statuses = [(s.name, s.status.status_code) for s in doomed]
    assert statuses[1] == ("saga step charge", StatusCode.ERROR)  # the hiccup
    assert statuses[3] == statuses[4] == ("saga step ship", StatusCode.ERROR)
    assert statuses[2][1] is StatusCode.UNSET
    assert {s.status.status_code for s in ok[2:] + doomed[5:]} == {StatusCode.UNSET}
    (event,) = doomed[3].events
    assert event.name == "exception"


async def test_the_global_tracer_provider_is_left_alone(
    spans: tuple[TracerProvider, InMemorySpanExporter], tmp_path: Path
) -> None:
    before = trace.get_tracer_provider()
    app = App(
        f"sqlite:///{tmp_path / 'sagas.db'}",
        poll_interval=0.05,
        middleware=[Tracing(tracer_provider=spans[0])],
    )
    app.register(order_saga("Order"))
    try:
        await (await app.start("Order", {})).result(timeout=5)
    finally:
        await app.close()
    assert trace.get_tracer_provider() is before
    names = sorted(s.name for s in spans[1].get_finished_spans())
    # charge fails once (the hiccup) and is retried: two spans
    steps = ("charge", "charge", "reserve", "ship")
    assert names == ["saga Order", *(f"saga step {n}" for n in steps)]


async def test_saga_hook_span_is_the_parent_of_its_steps(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """The saga-level hook the engine does not call yet, driven by hand."""
    tracing = Tracing(tracer_provider=spans[0])
    call = StepCall(saga_id="s-1", saga_type="Order", step="reserve#2", attempt=1,
                    compensation=False, data=None)  # fmt: skip

    async def body() -> str:
        return "completed"

    async def run() -> Any:
        return await tracing.step(call, body)

    state = await tracing.saga(SimpleNamespace(saga_id="s-1", saga_type="Order"), run)
    assert state == "completed"
    step_span, saga_span = spans[1].get_finished_spans()
    assert (saga_span.name, step_span.name) == ("saga Order", "saga step reserve")
    assert saga_span.context is not None
    assert step_span.parent is not None
    assert step_span.parent.span_id == saga_span.context.span_id
    assert saga_span.parent is not None
    assert saga_span.parent.span_id == saga_span_context("s-1").span_id
    assert (saga_span.attributes or {})["saga.state"] == "completed"


def test_trace_context_travels_in_an_envelope(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer = spans[0].get_tracer("test")
    with tracer.start_as_current_span("send") as sending:
        message = Envelope.new("Inventory.Reserve", {"sku": "X"}, **trace_fields())
        headers = inject({})
    assert message.traceparent is not None
    assert "traceparent" in headers  # the default global propagator is W3C

    received = trace.get_current_span(extract(message)).get_span_context()
    assert received.trace_id == sending.get_span_context().trace_id
    assert received.span_id == sending.get_span_context().span_id
    assert received.is_remote
    assert not trace.get_current_span(extract(Envelope.new("Nothing"))).get_span_context().is_valid


# -- metrics -----------------------------------------------------------------------------------


async def test_metrics_scraped_after_a_run(observed: tuple[App, Metrics, list[str]]) -> None:
    app, metrics, _ = observed
    assert metrics.snapshot is None
    await metrics.refresh(app)
    body, content_type = metrics.exposition()
    assert content_type == CONTENT_TYPE_LATEST
    text = body.decode()
    for name in (
        "sagakit_step_duration_seconds_bucket",
        "sagakit_step_retries_total",
        "sagakit_compensations_total",
        "sagakit_sagas_needs_attention",
        "sagakit_outbox_lag_seconds",
    ):
        assert name in text

    r: CollectorRegistry = metrics.registry

    def value(name: str, **labels: str) -> float | None:
        return r.get_sample_value(name, labels)

    for saga_type in ("Order", "DoomedOrder"):
        for s in ("reserve", "charge"):
            assert value("sagakit_step_duration_seconds_count", saga_type=saga_type, step=s,
                         outcome="completed") == 1  # fmt: skip
        assert value("sagakit_step_duration_seconds_count", saga_type=saga_type, step="charge",
                     outcome="failed") == 1  # fmt: skip
        assert value("sagakit_step_retries_total", saga_type=saga_type, step="charge") == 1
        assert value("sagakit_step_retries_total", saga_type=saga_type, step="reserve") is None
    assert value("sagakit_step_duration_seconds_count", saga_type="Order", step="ship",
                 outcome="completed") == 1  # fmt: skip
    assert value("sagakit_step_duration_seconds_count", saga_type="DoomedOrder", step="ship",
                 outcome="failed") == 2  # fmt: skip
    assert value("sagakit_step_retries_total", saga_type="DoomedOrder", step="ship") == 1
    for s in ("reserve", "charge"):
        assert value("sagakit_compensations_total", saga_type="DoomedOrder", step=s,
                     outcome="completed") == 1  # fmt: skip
    assert value("sagakit_compensations_total", saga_type="Order", step="reserve",
                 outcome="completed") is None  # fmt: skip

    assert value("sagakit_sagas", state="completed") == 1
    assert value("sagakit_sagas", state="failed") == 1
    assert value("sagakit_sagas_in_flight") == 0
    assert value("sagakit_sagas_needs_attention") == 0
    assert value("sagakit_outbox_messages") == 0
    assert value("sagakit_outbox_lag_seconds") == 0


async def test_outbox_lag_is_measured_from_the_oldest_message() -> None:
    class Store:
        async def counts(self) -> dict[str, int]:
            return {"running": 2, "needs_attention": 1}

        async def outbox_stats(self) -> tuple[int, float | None]:
            return 3, 1000.0

    metrics = Metrics()
    snap = await metrics.refresh(SimpleNamespace(store=Store()))
    r = metrics.registry
    assert r.get_sample_value("sagakit_outbox_messages") == 3
    assert r.get_sample_value("sagakit_outbox_lag_seconds") == pytest.approx(snap.taken_at - 1000)
    assert r.get_sample_value("sagakit_sagas_in_flight") == 2
    assert r.get_sample_value("sagakit_sagas_needs_attention") == 1


async def test_saga_hook_counts_final_states_and_runs_in_progress() -> None:
    metrics = Metrics()
    call = SimpleNamespace(saga_id="s-1", saga_type="Order")
    seen: list[float | None] = []

    async def finish() -> str:
        seen.append(metrics.registry.get_sample_value("sagakit_saga_runs_active",
                                                      {"saga_type": "Order"}))  # fmt: skip
        return "failed"

    async def suspend() -> str:
        return "running"  # waiting on a timer: not an outcome

    await metrics.saga(call, finish)
    await metrics.saga(call, suspend)
    assert seen == [1]
    r = metrics.registry
    assert r.get_sample_value("sagakit_saga_runs_active", {"saga_type": "Order"}) == 0
    assert r.get_sample_value("sagakit_sagas_finished_total",
                              {"saga_type": "Order", "outcome": "failed"}) == 1  # fmt: skip
    assert r.get_sample_value("sagakit_sagas_finished_total",
                              {"saga_type": "Order", "outcome": "running"}) is None  # fmt: skip


async def test_a_remote_steps_trace_goes_on_in_its_service(
    spans: tuple[TracerProvider, InMemorySpanExporter], tmp_path: Path
) -> None:
    """The command carries the saga run's trace context; the service's handler span is its
    child, in the saga's trace."""
    from sagakit import remote
    from sagakit.service import HandlerContext, Service

    provider, exporter = spans
    broker = f"memory://trace{tmp_path.name}"
    service = Service(
        "Inventory",
        broker=broker,
        inbox=f"sqlite:///{tmp_path / 'inbox.db'}",
        tracer_provider=provider,
    )

    @service.handles("Reserve")
    async def reserve(ctx: HandlerContext, data: Any) -> str:
        return "R-1"

    app = App(
        f"sqlite:///{tmp_path / 'sagas.db'}",
        broker=broker,
        poll_interval=0.05,
        middleware=[Tracing(tracer_provider=provider)],
    )
    app.register(Saga("Traced", steps=[step("reserve", remote("Inventory.Reserve"), timeout=10)]))
    async with service, app:
        handle = await app.start("Traced", None)
        assert await handle.result(timeout=10) == {"reserve": "R-1"}
    root = saga_span_context(handle.id)
    (handled,) = [s for s in exporter.get_finished_spans() if s.name == "handle Inventory.Reserve"]
    assert handled.context is not None
    assert handled.parent is not None
    assert handled.context.trace_id == root.trace_id
    runs = {
        s.context.span_id
        for s in exporter.get_finished_spans()
        if s.name == "saga Traced" and s.context is not None
    }
    assert handled.parent.span_id in runs  # the run that sent the command
    assert (handled.attributes or {})["saga.id"] == handle.id
