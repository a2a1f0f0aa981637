"""The benchmarks' order saga: four trivial steps with compensations, every 10th order
declined at payment. Shared by run.py (in-process) and workers.py (worker processes)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from sagakit import App, Saga, step
from sagakit.workflow import StepContext

STEPS = 4


class Declined(Exception):
    pass


async def reserve(ctx: StepContext, order: dict[str, Any]) -> dict[str, Any]:
    return {"reservation": order["id"]}


async def release(ctx: StepContext, order: dict[str, Any], result: Any) -> None:
    return None


async def charge(ctx: StepContext, order: dict[str, Any]) -> dict[str, Any]:
    if order["id"] % 10 == 0:
        raise Declined("card declined")
    return {"payment": order["id"]}


async def refund(ctx: StepContext, order: dict[str, Any], result: Any) -> None:
    return None


async def ship(ctx: StepContext, order: dict[str, Any]) -> dict[str, Any]:
    return {"shipment": order["id"]}


async def cancel_shipment(ctx: StepContext, order: dict[str, Any], result: Any) -> None:
    return None


async def confirm(ctx: StepContext, order: dict[str, Any]) -> str:
    return "sent"


async def cancel_notice(ctx: StepContext, order: dict[str, Any], result: Any) -> None:
    return None


ORDER_SAGA = Saga(
    "OrderFulfillment",
    steps=[
        step("reserve_inventory", reserve, compensate=release),
        step("process_payment", charge, compensate=refund),
        step("create_shipment", ship, compensate=cancel_shipment),
        step("send_confirmation", confirm, compensate=cancel_notice),
    ],
)


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
