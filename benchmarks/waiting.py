"""Sagas beside a backlog of waiting ones: the order saga's throughput, and the cost of an
idle claim (a worker's poll when nothing is due), with 0 and with N sagas unloaded in a
30-day wait (pending approvals), on SQLite and PostgreSQL.

Run with ``.venv/bin/python benchmarks/waiting.py`` (``--waiting 20000``). A claim that had to
walk past every waiting saga would get slower as the backlog grows; the figures say whether
it does, as ratios within this run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sagakit import App, SagaFailed, WorkflowContext
from sagakit.bench import ORDER_SAGA, drive, scratch_schema


async def _fill(app: App, waiting: int) -> None:
    """Start ``waiting`` sagas that sleep for 30 days, and wait until all are unloaded."""
    numbers = iter(range(waiting))

    async def lane() -> None:
        for n in numbers:
            await app.start("Approval", {"n": n})

    await asyncio.gather(*(lane() for _ in range(32)))
    while True:
        infos = await app.list(saga_type="Approval", limit=waiting + 1)
        if sum(i.waiting for i in infos) == waiting:
            return
        await asyncio.sleep(0.5)


async def measure(url: str, waiting: int, sagas: int, in_flight: int) -> tuple[float, float]:
    """(order sagas per second, ms per idle claim) on ``url`` with ``waiting`` sagas waiting."""
    app = App(url)
    app.register(ORDER_SAGA)

    @app.saga("Approval")
    async def approval(ctx: WorkflowContext, data: Any) -> None:
        await ctx.sleep(timedelta(days=30))

    async def one(order: dict[str, Any]) -> bool:
        try:
            await (await app.start(ORDER_SAGA.name, order)).result()
        except SagaFailed:
            return False
        return True

    async with app:
        await _fill(app, waiting)
        await drive(min(sagas, 50), in_flight, one)  # warm-up
        rate = (await drive(sagas, in_flight, one)).rate
        claims = []
        for _ in range(30):
            began = time.perf_counter()
            assert await app.store.claim(16) == []  # nothing is due: a worker's idle poll
            claims.append(time.perf_counter() - began)
    return rate, statistics.median(claims) * 1000


async def main(args: argparse.Namespace) -> None:
    console = Console()
    table = Table(title=f"order saga, {args.in_flight} in flight, beside sagas waiting 30 days")
    for column in ("backend", "waiting", "sagas/s", "idle claim"):
        table.add_column(column, justify="right")
    for backend in args.backends:
        base: dict[int, tuple[float, float]] = {}
        for waiting in (0, args.waiting):
            console.print(f"· {backend}, {waiting} waiting", highlight=False)
            if backend == "sqlite":
                workdir = Path(tempfile.mkdtemp(prefix="sagakit-waiting-"))
                try:
                    url = f"sqlite:///{workdir / 'w.db'}"
                    base[waiting] = await measure(url, waiting, args.sagas, args.in_flight)
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
            else:
                async with scratch_schema(args.pg) as url:
                    base[waiting] = await measure(url, waiting, args.sagas, args.in_flight)
        for waiting, (rate, claim) in base.items():
            table.add_row(backend, f"{waiting:,}", f"{rate:,.0f}", f"{claim:.2f} ms")
        slow = base[0][0] / base[args.waiting][0]
        console.print(f"  {backend}: throughput with the backlog is 1/{slow:.2f} of without")
    console.print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--waiting", type=int, default=20_000, help="sagas waiting 30 days")
    parser.add_argument("--sagas", type=int, default=1000, help="order sagas measured")
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    asyncio.run(main(parser.parse_args()))
