"""Prometheus metrics: a middleware for step calls, a collector for what the store knows.

Step calls are counted as they happen (in this process); a remote step's attempt is counted by
the process that learns its outcome, once (see :mod:`sagakit.middleware`), its latency the
time from its command's send to its reply. Saga counts by state,
``needs_attention`` and outbox lag are the *database's* view, shared by every worker; reading
them is async, and Prometheus collects synchronously, so :meth:`Metrics.refresh` reads them
into a snapshot that scrapes then report. Refresh before serving a scrape, or keep a task on
it::

    metrics = Metrics()                        # its own registry; Metrics(REGISTRY) to share
    app = App(url, middleware=[metrics])
    task = asyncio.create_task(metrics.refresh_forever(app, interval=15))

    async def metrics_route():                 # e.g. GET /metrics
        await metrics.refresh(app)             # optional: a fresh store snapshot
        body, content_type = metrics.exposition()
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sagakit.middleware import Middleware, Proceed, RemoteDone, StepCall
from sagakit.observability.hooks import SagaRunCall, step_label

__all__ = ["Metrics", "StoreSnapshot", "StoreStats", "exposition"]

log = logging.getLogger("sagakit.observability")

IN_FLIGHT_STATES = ("started", "running", "compensating")
FINAL_STATES = frozenset({"completed", "failed", "cancelled", "needs_attention"})


class StoreStats(Protocol):
    """What the collector reads: the two methods of :class:`sagakit.store.base.Store`."""

    async def counts(self) -> dict[str, int]: ...

    async def outbox_stats(self) -> tuple[int, float | None]: ...


class _HasStore(Protocol):
    @property
    def store(self) -> StoreStats: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSnapshot:
    """The store's figures at ``taken_at`` (seconds since the epoch)."""

    counts: Mapping[str, int] = field(default_factory=dict)
    outbox_size: int = 0
    outbox_oldest: float | None = None
    taken_at: float = 0.0


class _StoreCollector(Collector):
    """Reports the last :class:`StoreSnapshot` (nothing before the first refresh)."""

    def __init__(self) -> None:
        self.snapshot: StoreSnapshot | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.snapshot
        if snap is None:
            return
        by_state = GaugeMetricFamily(
            "sagakit_sagas", "Sagas in the database by state.", labels=["state"]
        )
        for state, n in sorted(snap.counts.items()):
            by_state.add_metric([state], n)
        yield by_state
        in_flight = sum(snap.counts.get(s, 0) for s in IN_FLIGHT_STATES)
        yield GaugeMetricFamily(
            "sagakit_sagas_in_flight",
            "Sagas started, running or compensating (the database's view).",
            value=in_flight,
        )
        yield GaugeMetricFamily(
            "sagakit_sagas_needs_attention",
            "Sagas parked for an operator (retry or resolve them).",
            value=snap.counts.get("needs_attention", 0),
        )
        yield GaugeMetricFamily(
            "sagakit_outbox_messages", "Messages waiting in the outbox.", value=snap.outbox_size
        )
        lag = 0.0 if snap.outbox_oldest is None else max(0.0, snap.taken_at - snap.outbox_oldest)
        yield GaugeMetricFamily(
            "sagakit_outbox_lag_seconds",
            "Age of the oldest message waiting in the outbox (0 when empty).",
            value=lag,
        )
        yield GaugeMetricFamily(
            "sagakit_store_snapshot_timestamp_seconds",
            "When the store figures above were read.",
            value=snap.taken_at,
        )


class Metrics(Middleware):
    """Middleware recording Prometheus metrics of step and compensation calls, and the
    collector of the store's figures (see :meth:`refresh`).

    Args:
        registry: where the metrics are registered; None for a registry of its own
            (:attr:`registry`). Pass ``prometheus_client.REGISTRY`` to join the process-wide
            one; one ``Metrics`` per registry.
        buckets: step latency histogram buckets, in seconds.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        buckets: tuple[float, ...] = Histogram.DEFAULT_BUCKETS,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self.step_seconds = Histogram(
            "sagakit_step_duration_seconds",
            "Duration of step action calls (of a remote step: from its command's send to its "
            "reply), by outcome (completed, failed, cancelled; timed_out for a remote step).",
            ["saga_type", "step", "outcome"],
            registry=r,
            buckets=buckets,
        )
        self.retries = Counter(
            "sagakit_step_retries",
            "Step action calls after the first attempt.",
            ["saga_type", "step"],
            registry=r,
        )
        self.compensations = Counter(
            "sagakit_compensations",
            "Compensation calls, by outcome (completed, failed, cancelled; timed_out for a "
            "remote compensation).",
            ["saga_type", "step", "outcome"],
            registry=r,
        )
        self.sagas = Counter(
            "sagakit_sagas_finished",
            "Saga runs that ended in a final state, by type and outcome (needs the saga hook).",
            ["saga_type", "outcome"],
            registry=r,
        )
        self.running = Gauge(
            "sagakit_saga_runs_active",
            "Sagas executing in this process now (needs the saga hook).",
            ["saga_type"],
            registry=r,
        )
        self._store = _StoreCollector()
        r.register(self._store)

    async def step(self, call: StepCall, proceed: Proceed) -> Any:
        name = step_label(call.step)
        if not call.compensation and call.attempt > 1:
            self.retries.labels(call.saga_type, name).inc()
        if call.remote:  # the send of a command: its outcome comes to remote_done
            return await proceed()
        started = time.perf_counter()
        outcome = "failed"
        try:
            result = await proceed()
            outcome = "completed"
            return result
        except Exception:
            raise
        except BaseException:
            outcome = "cancelled"  # a timed-out call is cancelled by the engine
            raise
        finally:
            if call.compensation:
                self.compensations.labels(call.saga_type, name, outcome).inc()
            else:
                elapsed = time.perf_counter() - started
                self.step_seconds.labels(call.saga_type, name, outcome).observe(elapsed)

    async def remote_done(self, done: RemoteDone, proceed: Proceed) -> Any:
        """A remote attempt's outcome, counted once it is journaled: its send-to-reply time
        in the step latency histogram, or a compensation."""
        result = await proceed()
        call = done.call
        name = step_label(call.step)
        if call.compensation:
            self.compensations.labels(call.saga_type, name, done.outcome).inc()
        else:
            elapsed = max(0.0, done.done_at - done.sent_at)
            self.step_seconds.labels(call.saga_type, name, done.outcome).observe(elapsed)
        return result

    async def saga(self, call: SagaRunCall, proceed: Proceed) -> Any:
        """The saga-level hook: sagas executing now, and the final state each run reached."""
        with self.running.labels(call.saga_type).track_inprogress():
            state = await proceed()
        outcome = str(getattr(state, "value", state))
        if outcome in FINAL_STATES:
            self.sagas.labels(call.saga_type, outcome).inc()
        return state

    @property
    def snapshot(self) -> StoreSnapshot | None:
        """The store figures scrapes report now (None before the first refresh)."""
        return self._store.snapshot

    async def refresh(self, app: _HasStore) -> StoreSnapshot:
        """Read saga counts and outbox figures from ``app.store`` for the following scrapes."""
        counts = await app.store.counts()
        size, oldest = await app.store.outbox_stats()
        snap = StoreSnapshot(
            counts={str(k): v for k, v in counts.items()},
            outbox_size=size,
            outbox_oldest=oldest,
            taken_at=time.time(),
        )
        self._store.snapshot = snap
        return snap

    async def refresh_forever(self, app: _HasStore, *, interval: float = 15.0) -> None:
        """:meth:`refresh` every ``interval`` seconds until cancelled. A failed read keeps
        the previous snapshot (its timestamp shows its age) and is tried again."""
        while True:
            try:
                await self.refresh(app)
            except Exception:  # a database hiccup must not end the metrics task
                log.warning("could not read saga metrics from the store", exc_info=True)
            await asyncio.sleep(interval)

    def exposition(self) -> tuple[bytes, str]:
        """The text of a scrape of :attr:`registry` and its content type."""
        return exposition(self.registry)


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """``(body, content_type)`` for a ``/metrics`` response of ``registry``."""
    return _generate_latest(registry), CONTENT_TYPE_LATEST
