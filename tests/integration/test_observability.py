"""Observability middleware on a real SQLite App: log fields, spans, Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from broker_env import URLS, broker_lock, cleanup, require_broker, with_options
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from sagakit import App, Entry, Kind, RetryPolicy, Saga, SagaFailed, remote, step
from sagakit.messaging.envelope import Envelope
from sagakit.middleware import Middleware, Proceed, RemoteDone, StepCall
from sagakit.observability import LogContext, Metrics, SagaLogFilter, Tracing
from sagakit.observability.tracing import extract, inject, saga_span_context, trace_fields
from sagakit.service import HandlerContext, Service

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
    """The saga-level hook (which the worker calls around each run) driven by hand."""
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


# -- remote steps ------------------------------------------------------------------------------
#
# A remote step's command is sent in one run of the saga and its reply consumed in a later one:
# its span, latency and counts must come out once, with the span between the run that sent the
# command and the service's handler span.

REMOTE_RETRY = RetryPolicy(max_attempts=2, initial_interval=0.01, jitter=0)
RemoteApp = Callable[..., App]


def remote_order(name: str = "RemoteOrder") -> Saga:
    reserve = step("reserve", remote("Inventory.Reserve"), timeout=20,
                   compensate=remote("Inventory.Release"))  # fmt: skip
    charge = step("charge", remote("Payments.Charge"), retry=REMOTE_RETRY, timeout=20)
    return Saga(name, steps=[reserve, charge])


def shop(broker: str, tmp_path: Path, provider: TracerProvider) -> tuple[Service, Service]:
    """The Inventory and Payments services, in-process; a charge with ``decline`` fails."""
    inventory = Service("Inventory", broker=broker, tracer_provider=provider,
                        inbox=f"sqlite:///{tmp_path / 'inventory.db'}")  # fmt: skip
    payments = Service("Payments", broker=broker, tracer_provider=provider,
                       inbox=f"sqlite:///{tmp_path / 'payments.db'}")  # fmt: skip

    @inventory.handles("Reserve")
    async def reserve(ctx: HandlerContext, data: Any) -> Any:
        return {"reservation": f"R-{data['order']}"}

    @inventory.handles("Release")
    async def release(ctx: HandlerContext, data: Any) -> None:
        return None

    @payments.handles("Charge")
    async def charge(ctx: HandlerContext, data: Any) -> Any:
        if data.get("decline"):
            raise ValueError("card declined")
        return {"payment": f"P-{data['order']}"}

    return inventory, payments


# What the tests' App and services declare on a real broker, deleted after each test.
QUEUES = [
    ("Inventory.Reserve", "Inventory"),
    ("Inventory.Release", "Inventory"),
    ("Payments.Charge", "Payments"),
    ("sagakit.replies", "sagakit-orchestrator"),
]


@pytest.fixture(params=["memory", "rabbitmq"])
async def remote_broker(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A broker URL with a namespace (prefix) of its own; on RabbitMQ, under the shared broker
    lock (no restart test stops it meanwhile), its queues and exchange deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if request.param == "memory":
        yield f"memory://{prefix}"
        return
    require_broker("rabbitmq")
    url = with_options(URLS["rabbitmq"], prefix=prefix)
    async with broker_lock(exclusive=False):
        try:
            yield url
        finally:
            queues = [f"{prefix}.{group}.{topic}" for topic, group in QUEUES]
            await cleanup(URLS["rabbitmq"], prefix, queues)


@pytest.fixture
def remote_app(tmp_path: Path) -> RemoteApp:
    def make(broker: str, *middleware: Middleware) -> App:
        app = App(f"sqlite:///{tmp_path / 'sagas.db'}", broker=broker, poll_interval=0.05,
                  middleware=list(middleware))  # fmt: skip
        app.register(remote_order())
        return app

    return make


class Tree:
    """The finished spans of one saga: its runs, its step and compensation spans, and the
    service handler spans of its commands."""

    def __init__(self, exporter: InMemorySpanExporter, saga_id: str) -> None:
        mine = [
            s
            for s in exporter.get_finished_spans()
            if (s.attributes or {}).get("saga.id") == saga_id
        ]
        self.runs = [s for s in mine if s.name == "saga RemoteOrder"]
        self.steps = sorted(
            (s for s in mine if s.name.startswith(("saga step ", "saga compensation "))),
            key=lambda s: s.start_time or 0,
        )
        self.handlers = [s for s in mine if s.name.startswith("handle ")]

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.steps if s.name == name]

    def handler_of(self, span: ReadableSpan) -> ReadableSpan:
        """The one handler span whose parent is ``span``."""
        assert span.context is not None
        found = [h for h in self.handlers if h.parent and h.parent.span_id == span.context.span_id]
        assert len(found) == 1, (span.name, [h.name for h in self.handlers])
        return found[0]

    def check_links(self, saga_id: str) -> None:
        """Every step span is a child of a run span of this saga (the run that sent its
        command), and the parent of exactly one handler span, all in the saga's trace."""
        trace_id = saga_span_context(saga_id).trace_id
        run_ids = {r.context.span_id for r in self.runs if r.context is not None}
        for s in self.steps:
            assert s.context is not None
            assert s.parent is not None
            assert s.context.trace_id == trace_id
            assert s.parent.span_id in run_ids, s.name
            assert s.kind is SpanKind.CLIENT
            handled = self.handler_of(s)
            assert handled.context is not None
            assert handled.context.trace_id == trace_id
            assert (handled.attributes or {})["saga.step"] == (s.attributes or {})["saga.step"]
            assert (handled.attributes or {})["saga.attempt"] == (s.attributes or {})[
                "saga.attempt"
            ]
            # the span runs from the send to the reply: around its handler
            assert (s.start_time or 0) <= (handled.start_time or 0)
            assert (s.end_time or 0) >= (handled.end_time or 0) - 1_000_000  # float seconds


async def _started(app: App, saga_id: str, step_name: str) -> Entry:
    """The STEP_STARTED entry of ``step_name`` once it is in the journal."""
    async with asyncio.timeout(20):
        while True:
            for e in await app.journal(saga_id):
                if e.kind is Kind.STEP_STARTED and e.step == step_name:
                    return e
            await asyncio.sleep(0.02)


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_a_remote_step_span_is_between_its_run_and_the_service_handler(
    spans: tuple[TracerProvider, InMemorySpanExporter], tmp_path: Path, remote_app: RemoteApp
) -> None:
    provider, exporter = spans
    broker = f"memory://remote{uuid.uuid4().hex[:8]}"
    metrics = Metrics()
    app = remote_app(broker, Tracing(tracer_provider=provider), metrics)
    inventory, payments = shop(broker, tmp_path, provider)
    async with inventory, payments, app:
        handle = await app.start("RemoteOrder", {"order": 1})
        result = await handle.result(timeout=20)
        journal = await app.journal(handle.id)
    assert result == {"reserve": {"reservation": "R-1"}, "charge": {"payment": "P-1"}}

    tree = Tree(exporter, handle.id)
    assert [s.name for s in tree.steps] == ["saga step reserve", "saga step charge"]
    tree.check_links(handle.id)
    reserve, charge = tree.steps
    assert reserve.parent is not None
    assert charge.parent is not None
    # reserve's reply is consumed by the run that sends charge's command: another run
    assert reserve.parent.span_id != charge.parent.span_id
    assert dict(charge.attributes or {}) == {
        "saga.id": handle.id,
        "saga.type": "RemoteOrder",
        "saga.step": "charge",
        "saga.step.name": "charge",
        "saga.attempt": 1,
        "saga.compensation": False,
        "saga.step.kind": "compensatable",
        "saga.command": "Payments.Charge",
        "saga.outcome": "completed",
    }
    assert {s.status.status_code for s in tree.steps} == {StatusCode.UNSET}
    # it starts when the attempt's start (with its command) was journaled
    started = {e.step: e for e in journal if e.kind is Kind.STEP_STARTED}
    for s in tree.steps:
        at = started[(s.attributes or {})["saga.step"]].at
        assert abs((s.start_time or 0) - at * 1e9) < 1_000_000

    for name in ("reserve", "charge"):
        assert _value(metrics, "sagakit_step_duration_seconds_count", saga_type="RemoteOrder",
                      step=name, outcome="completed") == 1  # fmt: skip
    total = _value(metrics, "sagakit_step_duration_seconds_sum", saga_type="RemoteOrder",
                   step="charge", outcome="completed")  # fmt: skip
    assert total is not None
    assert charge.end_time is not None
    assert charge.start_time is not None
    assert total == pytest.approx((charge.end_time - charge.start_time) / 1e9, abs=1e-3)
    assert _value(metrics, "sagakit_step_retries_total", saga_type="RemoteOrder",
                  step="charge") is None  # fmt: skip


async def test_a_failed_remote_step_is_retried_then_compensated_remotely(
    spans: tuple[TracerProvider, InMemorySpanExporter],
    tmp_path: Path,
    remote_app: RemoteApp,
    remote_broker: str,
    saga_caplog: pytest.LogCaptureFixture,
) -> None:
    provider, exporter = spans
    metrics = Metrics()

    class Sending(Middleware):
        async def step(self, call: StepCall, proceed: Proceed) -> Any:
            if call.remote:
                steps_log.info("sending %s", call.command)
            return await proceed()

    app = remote_app(remote_broker, LogContext(), Tracing(tracer_provider=provider), metrics,
                     Sending())  # fmt: skip
    inventory, payments = shop(remote_broker, tmp_path, provider)
    async with inventory, payments, app:
        handle = await app.start("RemoteOrder", {"order": 2, "decline": True})
        with pytest.raises(SagaFailed):
            await handle.result(timeout=30)

    tree = Tree(exporter, handle.id)
    assert [(s.name, (s.attributes or {})["saga.attempt"]) for s in tree.steps] == [
        ("saga step reserve", 1),
        ("saga step charge", 1),
        ("saga step charge", 2),
        ("saga compensation reserve", 1),
    ]
    tree.check_links(handle.id)
    reserve, charge1, charge2, release = tree.steps
    assert tree.handler_of(release).name == "handle Inventory.Release"
    assert (release.attributes or {})["saga.compensation"] is True
    assert (release.attributes or {})["saga.command"] == "Inventory.Release"
    for s in (reserve, release):
        assert s.status.status_code is StatusCode.UNSET
    for s in (charge1, charge2):
        assert s.status.status_code is StatusCode.ERROR
        assert s.status.description is not None
        assert "RemoteStepFailed" in s.status.description
        assert "card declined" in s.status.description
        assert (s.attributes or {})["saga.outcome"] == "failed"
        (event,) = s.events
        assert event.name == "exception"
        handled = tree.handler_of(s)  # the service's span of the attempt failed too
        assert handled.status.status_code is StatusCode.ERROR
        assert handled.status.description == "ValueError: card declined"
        assert [e.name for e in handled.events] == ["exception"]
    assert tree.handler_of(release).status.status_code is StatusCode.UNSET
    # the retry is sent after the failed reply came
    assert (charge2.start_time or 0) >= (charge1.end_time or 0) - 1_000_000

    def value(name: str, **labels: str) -> float | None:
        return _value(metrics, name, saga_type="RemoteOrder", **labels)

    assert value("sagakit_step_duration_seconds_count", step="reserve", outcome="completed") == 1
    assert value("sagakit_step_duration_seconds_count", step="charge", outcome="failed") == 2
    assert value("sagakit_step_retries_total", step="charge") == 1
    assert value("sagakit_compensations_total", step="reserve", outcome="completed") == 1
    assert value("sagakit_compensations_total", step="charge", outcome="completed") is None

    seen = [
        (r.getMessage(), r.step, r.attempt)  # type: ignore[attr-defined]
        for r in saga_caplog.records
        if getattr(r, "saga_id", None) == handle.id
        and (r.name == steps_log.name or "retrying" in r.getMessage())
    ]
    assert seen == [
        ("sending Inventory.Reserve", "reserve", 1),
        ("sending Payments.Charge", "charge", 1),
        (next(m for m, *_ in seen if "retrying" in m), "charge", 1),
        ("sending Payments.Charge", "charge", 2),
        ("sending Inventory.Release", "reserve", 1),
    ]


async def test_a_restart_while_a_reply_is_awaited_observes_each_outcome_once(
    spans: tuple[TracerProvider, InMemorySpanExporter], tmp_path: Path, remote_app: RemoteApp
) -> None:
    """The charge command is sent by one App, which stops; its reply is consumed by another
    App (another process, as far as tracing and metrics go), whose run replays reserve."""
    service_provider, exporter = spans
    broker = f"memory://restart{uuid.uuid4().hex[:8]}"
    inventory, payments = shop(broker, tmp_path, service_provider)
    before, after = Metrics(), Metrics()
    first = remote_app(broker, Tracing(tracer_provider=service_provider), before)
    async with inventory, first:  # no Payments service yet: the charge waits for its reply
        handle = await first.start("RemoteOrder", {"order": 3})
        sent = await _started(first, handle.id, "charge")
        async with asyncio.timeout(20):  # relayed to the broker
            while (await first.store.outbox_stats())[0]:
                await asyncio.sleep(0.02)
    first_runs = {s.context.span_id for s in Tree(exporter, handle.id).runs if s.context}

    provider = TracerProvider()  # the second process's own provider, exporting to the same
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    second = remote_app(broker, Tracing(tracer_provider=provider), after)
    try:
        async with payments, second:
            assert await second.handle(handle.id).result(timeout=20) == {
                "reserve": {"reservation": "R-3"},
                "charge": {"payment": "P-3"},
            }
    finally:
        provider.shutdown()

    tree = Tree(exporter, handle.id)
    assert [s.name for s in tree.steps] == ["saga step reserve", "saga step charge"]
    tree.check_links(handle.id)
    charge = tree.steps[1]
    assert charge.parent is not None
    assert charge.parent.span_id in first_runs  # the run that sent it, before the restart
    assert len(tree.runs) > len(first_runs)  # and the second App ran the saga too
    assert charge.instrumentation_scope is not None
    assert abs((charge.start_time or 0) - sent.at * 1e9) < 1_000_000

    def count(metrics: Metrics, name: str) -> float | None:
        return _value(metrics, "sagakit_step_duration_seconds_count", saga_type="RemoteOrder",
                      step=name, outcome="completed")  # fmt: skip

    assert (count(before, "reserve"), count(before, "charge")) == (1, None)
    assert (count(after, "reserve"), count(after, "charge")) == (None, 1)


async def test_a_remote_step_that_times_out_has_an_error_span_and_is_compensated(
    spans: tuple[TracerProvider, InMemorySpanExporter], tmp_path: Path
) -> None:
    provider, exporter = spans
    broker = f"memory://timeout{uuid.uuid4().hex[:8]}"
    metrics = Metrics()
    shipping = Service("Shipping", broker=broker, tracer_provider=provider,
                       inbox=f"sqlite:///{tmp_path / 'shipping.db'}")  # fmt: skip

    @shipping.handles("Ship")
    async def ship(ctx: HandlerContext, data: Any) -> str:
        await asyncio.sleep(1.0)  # past the step's timeout: its reply comes too late
        return "S-1"

    # Another service (inbox) for the compensation: Ship's transaction holds Shipping's inbox.
    depot = Service("Depot", broker=broker, tracer_provider=provider,
                    inbox=f"sqlite:///{tmp_path / 'depot.db'}")  # fmt: skip

    @depot.handles("Unship")
    async def unship(ctx: HandlerContext, data: Any) -> None:
        return None

    app = App(f"sqlite:///{tmp_path / 'sagas.db'}", broker=broker, poll_interval=0.05,
              middleware=[Tracing(tracer_provider=provider), metrics])  # fmt: skip
    app.register(Saga("Slow", steps=[step("ship", remote("Shipping.Ship"), timeout=0.3,
                                          compensate=remote("Depot.Unship"))]))  # fmt: skip
    async with shipping, depot, app:
        handle = await app.start("Slow", None)
        with pytest.raises(SagaFailed):
            await handle.result(timeout=20)

    steps = sorted(_runs(exporter, handle.id, runs=False), key=lambda s: s.start_time or 0)
    assert [s.name for s in steps] == ["saga step ship", "saga compensation ship"]
    timed_out, undone = steps
    assert timed_out.status.status_code is StatusCode.ERROR
    assert (timed_out.status.description or "").startswith("StepTimedOut: ")
    assert (timed_out.attributes or {})["saga.outcome"] == "timed_out"
    assert ((timed_out.end_time or 0) - (timed_out.start_time or 0)) / 1e9 >= 0.3
    assert undone.status.status_code is StatusCode.UNSET
    r = metrics.registry
    labels = {"saga_type": "Slow", "step": "ship"}
    assert r.get_sample_value("sagakit_step_duration_seconds_count",
                              {**labels, "outcome": "timed_out"}) == 1  # fmt: skip
    assert r.get_sample_value("sagakit_step_duration_seconds_sum",
                              {**labels, "outcome": "timed_out"}) >= 0.3  # fmt: skip
    assert r.get_sample_value("sagakit_compensations_total",
                              {**labels, "outcome": "completed"}) == 1  # fmt: skip


async def test_middleware_sees_each_remote_attempt_sent_then_done(
    spans: tuple[TracerProvider, InMemorySpanExporter], tmp_path: Path, remote_app: RemoteApp
) -> None:
    """A middleware that fails a send fails that attempt (it is retried); one that raises on
    an outcome changes nothing; every attempt sent is reported done once."""
    seen: list[tuple[str, str, int, str]] = []

    class Watch(Middleware):
        async def step(self, call: StepCall, proceed: Proceed) -> Any:
            seen.append(("sent", call.step, call.attempt, call.command or ""))
            if call.step == "charge" and call.attempt == 1:
                raise ConnectionError("no route to the outbox today")
            assert await proceed() is None  # a send has no result
            return None

        async def remote_done(self, done: RemoteDone, proceed: Proceed) -> Any:
            await proceed()
            seen.append(("done", done.call.step, done.call.attempt, done.outcome))
            assert done.sent_at <= done.done_at
            raise RuntimeError("a broken exporter")

    broker = f"memory://watch{uuid.uuid4().hex[:8]}"
    app = remote_app(broker, Watch())
    inventory, payments = shop(broker, tmp_path, spans[0])
    async with inventory, payments, app:
        handle = await app.start("RemoteOrder", {"order": 4})
        assert (await handle.result(timeout=20))["charge"] == {"payment": "P-4"}
    assert seen == [
        ("sent", "reserve", 1, "Inventory.Reserve"),
        ("done", "reserve", 1, "completed"),
        ("sent", "charge", 1, "Payments.Charge"),
        ("done", "charge", 1, "failed"),
        ("sent", "charge", 2, "Payments.Charge"),
        ("done", "charge", 2, "completed"),
    ]


async def test_without_the_sdk_a_remote_step_span_is_linked_to_its_command(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A tracer that cannot be given span ids (not the SDK's): the outcome's span has an id of
    its own, and a link to the context its command carried."""
    provider, exporter = spans
    tracing = Tracing(tracer_provider=provider)
    sdk_tracer = tracing.tracer

    class Opaque(trace.Tracer):  # what a vendor's tracer looks like to sagakit: no ids
        def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
            return sdk_tracer.start_span(*args, **kwargs)

        def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
            return sdk_tracer.start_as_current_span(*args, **kwargs)

    tracing.tracer = Opaque()
    call = StepCall(saga_id="s-1", saga_type="Order", step="reserve", attempt=1,
                    compensation=False, data=None, command="Inventory.Reserve")  # fmt: skip
    carried: dict[str, str | None] = {}

    async def send() -> None:
        carried.update(trace_fields())

    async def record() -> None:
        pass

    async def run() -> str:
        await tracing.step(call, send)
        done = RemoteDone(call=call, outcome="timed_out", error=TimeoutError("no reply"),
                          sent_at=100.0, done_at=130.0, **carried)  # fmt: skip
        await tracing.remote_done(done, record)
        return "running"

    await tracing.saga(SimpleNamespace(saga_id="s-1", saga_type="Order"), run)
    step_span, saga_span = exporter.get_finished_spans()
    sent = trace.get_current_span(extract(Envelope.new("X", **carried))).get_span_context()
    assert step_span.context is not None
    assert saga_span.context is not None
    assert step_span.context.span_id != sent.span_id
    assert [link.context.span_id for link in step_span.links] == [sent.span_id]
    assert step_span.parent is not None
    assert step_span.parent.span_id == saga_span.context.span_id
    assert (step_span.start_time, step_span.end_time) == (100 * 10**9, 130 * 10**9)
    assert step_span.status.status_code is StatusCode.ERROR
    assert (step_span.attributes or {})["saga.outcome"] == "timed_out"
