"""Crash test: a worker process running the order-fulfilment example is SIGKILLed at random
moments, over and over, and restarted each time; afterwards every saga is completed or fully
compensated, nothing was applied twice, and no committed step ran again.

It drives the same machinery as ``sagakit demo`` (sagakit.demo), with more kills.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from sagakit import SagaState
from sagakit.demo import DemoConfig, QuietObserver, run_demo
from sagakit.examples.order_fulfillment import Simulation, sample_order

ORDERS = 240
KILLS = 14

pytestmark = pytest.mark.crash


def expected_failures(sim: Simulation, orders: int) -> dict[str, int]:
    """Where each order must fail: its fate is drawn from its id, crash or no crash."""
    failed_at: dict[str, int] = {}
    for n in range(1, orders + 1):
        declined, no_carrier, _ = sim.fate(sample_order(n).order_id)
        step = "process_payment" if declined else "create_shipment" if no_carrier else None
        if step is not None:
            failed_at[step] = failed_at.get(step, 0) + 1
    return failed_at


async def test_sigkill_at_random_moments_loses_and_repeats_nothing(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # Kill points are shares of settled sagas; repeats kill a worker that is still starting
    # or recovering, the jitter lands the others anywhere inside a step.
    kill_at = sorted(rng.uniform(0.02, 0.9) for _ in range(KILLS))
    config = DemoConfig(
        url=f"sqlite:///{tmp_path / 'sagas.db'}",
        ledger_path=tmp_path / "ledger.db",
        orders=ORDERS,
        kill_at=kill_at,
        kill_jitter=0.25,
        decline_rate=0.15,
        shipment_failure_rate=0.1,
        glitch_rate=0.1,
        latency=0.1,
        concurrency=24,
        timeout=90,
    )
    observer = QuietObserver()
    began = time.monotonic()
    report = await run_demo(config, observer)
    took = time.monotonic() - began
    context = f"seed {seed}, {took:.1f} s, events: {observer.events}"

    assert report.kills >= 10, context
    assert report.violations() == [], context
    # Every saga settled completed or failed; none started, running, compensating or parked.
    assert set(report.states) <= {SagaState.COMPLETED, SagaState.FAILED}, (report.states, context)
    assert sum(report.states.values()) == ORDERS, context
    assert report.ledger.applied_twice == [], context
    assert report.ledger.committed_reruns == 0, context
    assert report.ledger.unbalanced == [], context
    assert report.mismatches == [], context
    # Each order ended as its deterministic fate says, however often the worker died.
    sim = Simulation(decline_rate=0.15, shipment_failure_rate=0.1)
    assert report.failed_at == expected_failures(sim, ORDERS), context
    # The kills landed inside step bodies: some ran again, and the ledger absorbed them.
    assert report.ledger.reruns > 0, context
