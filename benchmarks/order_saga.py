"""The benchmarks' sagas. The order saga (four trivial steps with compensations, every 10th
order declined at payment) is ``sagakit.bench``'s, the one ``sagakit bench`` runs; the hold saga
keeps sagas in flight for the recovery benchmark. Shared by run.py (in-process), workers.py
(worker processes) and remote.py."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from sagakit import App, Saga, step
from sagakit.bench import ORDER_SAGA, STEPS, Declined, charge, confirm, release, reserve, ship
from sagakit.workflow import StepContext

__all__ = ["HOLD_SAGA", "ORDER_SAGA", "STEPS", "Declined", "charge", "confirm", "reserve", "ship",
           "worker_app"]  # fmt: skip


async def hold(ctx: StepContext, data: dict[str, Any]) -> str:
    """Keeps a saga in flight for ``data['seconds']``: the recovery benchmark's step."""
    await asyncio.sleep(data["seconds"])
    return "held"


HOLD_SAGA = Saga("Hold", steps=[step("reserve", reserve, compensate=release), step("hold", hold)])


def worker_app() -> App:
    """The App a benchmark worker process runs (``sagakit worker --app order_saga:app``)."""
    app = App(
        os.environ["SAGAKIT_BENCH_URL"],
        max_concurrency=int(os.environ.get("SAGAKIT_BENCH_CONCURRENCY", "200")),
        lease=float(os.environ.get("SAGAKIT_BENCH_LEASE", "10")),
        poll_interval=0.2,
    )
    app.register(ORDER_SAGA)
    app.register(HOLD_SAGA)
    return app


def __getattr__(name: str) -> Any:
    if name == "app":  # built on first use, so importing the module reads no environment
        return worker_app()
    raise AttributeError(name)
