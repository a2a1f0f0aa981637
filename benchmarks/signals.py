"""Signals stored per second on PostgreSQL: ``Store.send_signal``, the write behind
``App.signal`` and behind every reply of a remote step (the reply consumer stores each reply
as a signal of its saga), from 16 concurrent senders to 200 waiting sagas.

Run with ``.venv/bin/python benchmarks/signals.py`` (``--pg URL``); it prints three rounds and
their median.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Iterator
from typing import Any

from sagakit import App, WorkflowContext
from sagakit.bench import scratch_schema


async def _send(app: App, sagas: list[str], numbers: Iterator[int], round_: int) -> None:
    """One sender: signal the sagas in turn until ``numbers`` runs out."""
    for n in numbers:
        saga = sagas[n % len(sagas)]
        await app.store.send_signal(saga, f"{round_}-{n}", "memo", "1", time.time())


async def main(args: argparse.Namespace) -> None:
    async with scratch_schema(args.pg) as url:
        app = App(url, worker=False)

        @app.saga("Waiting")
        async def waiting(ctx: WorkflowContext, data: Any) -> Any:
            return await ctx.wait_for_signal("go")

        async with app:
            sagas = [(await app.start("Waiting", {})).id for _ in range(200)]
            rates = []
            for round_ in range(3):
                numbers = iter(range(args.signals))
                began = time.perf_counter()
                await asyncio.gather(
                    *(_send(app, sagas, numbers, round_) for _ in range(args.in_flight))
                )
                rates.append(args.signals / (time.perf_counter() - began))
    shown = ", ".join(f"{r:,.0f}" for r in rates)
    print(f"signals/s, {args.in_flight} senders: {shown}; median {statistics.median(rates):,.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--signals", type=int, default=3000, help="signals per round")
    parser.add_argument("--in-flight", type=int, default=16, help="concurrent senders")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    asyncio.run(main(parser.parse_args()))
