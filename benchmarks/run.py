"""sagakit benchmarks: the 4-step order saga against a plain-function floor.

Run with ``make bench`` (or ``.venv/bin/python benchmarks/run.py --help``). Prints sagas/s
sequentially and with 16 and 64 sagas in flight, the per-step overhead, and ratios measured in
this one run. Step bodies are trivial and 10 % of orders are declined at payment, so the figures
are the engine's own cost: journal writes, fsync, scheduling and encoding.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sagakit import App, Saga, SagaFailed, step
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


async def plain_saga(order: dict[str, Any]) -> bool:
    """The floor: the same steps as plain calls, compensations on failure, nothing durable."""
    done: list[tuple[Callable[..., Awaitable[None]], Any]] = []
    try:
        for s in ORDER_SAGA.steps:
            result = await s.action(None, order)
            assert s.compensate is not None
            done.append((s.compensate, result))
    except Declined:
        for compensate, result in reversed(done):
            await compensate(None, order, result)
        return False
    return True


async def run_floor(n: int, in_flight: int) -> float:
    return await drive(n, in_flight, plain_saga)


async def run_sagakit(n: int, in_flight: int, path: Path, durability: str) -> float:
    app = App(f"sqlite:///{path}", durability=durability)
    app.register(ORDER_SAGA)
    await app.open()

    async def one(order: dict[str, Any]) -> bool:
        handle = await app.start("OrderFulfillment", order)
        try:
            await handle.result()
        except SagaFailed:
            return False
        return True

    try:
        await drive(min(n, 50), in_flight, one)  # warm-up
        return await drive(n, in_flight, one)
    finally:
        await app.close()


async def drive(n: int, in_flight: int, one: Callable[[dict[str, Any]], Awaitable[bool]]) -> float:
    """Run ``n`` sagas with at most ``in_flight`` at once; return sagas per second."""
    orders = iter(range(1, n + 1))

    async def lane() -> None:
        for i in orders:
            await one({"id": i, "sku": "BOOK-1", "amount": "19.99"})

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return n / (time.perf_counter() - start)


async def main(args: argparse.Namespace) -> None:
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="sagakit-bench-"))
    rows: list[tuple[str, int, float, float]] = []
    try:
        for in_flight in (1, 16, 64):
            n = args.sequential if in_flight == 1 else args.concurrent
            floor = await run_floor(n, in_flight)
            for durability in args.durability:
                path = workdir / f"bench-{durability}-{in_flight}.db"
                rate = await run_sagakit(n, in_flight, path, durability)
                rows.append((durability, in_flight, rate, floor))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table = Table(title="sagakit on SQLite: 4-step order saga, 10 % declined at payment")
    for col in ("durability", "in flight", "sagas/s", "floor sagas/s", "floor / sagakit",
                "µs per step", "vs sequential"):  # fmt: skip
        table.add_column(col, justify="right")
    sequential = {d: r for d, f, r, _ in rows if f == 1}
    for durability, in_flight, rate, floor in rows:
        per_step = (1 / rate - 1 / floor) / STEPS * 1e6 * in_flight
        table.add_row(durability, str(in_flight), f"{rate:,.0f}", f"{floor:,.0f}",
                      f"{floor / rate:,.0f}x", f"{per_step:,.0f}",
                      f"{rate / sequential[durability]:.1f}x")  # fmt: skip
    console.print(table)
    console.print(
        "µs per step: wall time per saga minus the floor's, divided by 4 steps, times the sagas "
        "in flight (the latency one step adds)."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequential", type=int, default=500, help="sagas run one at a time")
    parser.add_argument("--concurrent", type=int, default=3000, help="sagas run concurrently")
    parser.add_argument("--durability", nargs="+", default=["full", "normal"])
    asyncio.run(main(parser.parse_args()))
