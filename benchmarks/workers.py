"""Worker-process benchmarks on PostgreSQL: scaling with workers, and recovery after SIGKILL.

1. Scaling: N sagas of the order saga are enqueued, then 1 worker process (and then 4) is
   started; the figure is sagas/s from the workers' start until every saga has ended. The
   ratio 4 workers / 1 worker is printed.
2. Recovery: a worker holds 1,000 sagas in flight (each waits in a step), is SIGKILLed, and a
   new worker is started at once; the figure is the time from the kill until every one of the
   1,000 sagas has written a journal entry again (it was claimed, its journal read, and its
   step re-run).

Run with ``make bench`` or ``.venv/bin/python benchmarks/workers.py [--pg URL]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sagakit import App
from sagakit.bench import scratch_schema
from sagakit.journal import TERMINAL

HERE = Path(__file__).resolve().parent
LOGS = Path(tempfile.mkdtemp(prefix="sagakit-bench-workers-"))


def spawn_worker(url: str, concurrency: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "SAGAKIT_BENCH_URL": url,
        "SAGAKIT_BENCH_CONCURRENCY": str(concurrency),
        "SAGAKIT_BENCH_LEASE": "5",
    }
    command = [sys.executable, "-m", "sagakit", "worker", "--app", "order_saga:app"]
    log = open(LOGS / f"worker-{len(list(LOGS.iterdir()))}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.wait(timeout=15)
        except subprocess.TimeoutExpired:
            w.kill()


async def enqueue(client: App, saga_type: str, n: int, data: dict[str, object]) -> None:
    async def lane(start: int) -> None:
        for i in range(start, n, 32):
            await client.start(saga_type, {**data, "id": i + 1})

    await asyncio.gather(*(lane(i) for i in range(32)))


async def settled(client: App, n: int) -> int:
    counts = await client.store.counts()
    return sum(c for state, c in counts.items() if state in TERMINAL) if counts else 0


async def scaling(base: str, workers: int, n: int) -> float:
    async with scratch_schema(base) as url:
        return await _scaling(url, workers, n)


async def _scaling(url: str, workers: int, n: int) -> float:
    client = App(url, worker=False)
    from order_saga import ORDER_SAGA

    client.register(ORDER_SAGA)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await enqueue(client, "OrderFulfillment", n, {"sku": "BOOK-1"})
        start = time.perf_counter()
        procs = [spawn_worker(url, 200) for _ in range(workers)]
        await poll_until(lambda: settled(client, n), n)
        return n / (time.perf_counter() - start)
    finally:
        stop(procs)
        await client.close()


async def recovery(base: str, n: int) -> float:
    async with scratch_schema(base) as url:
        return await _recovery(url, n)


async def _recovery(url: str, n: int) -> float:
    client = App(url, worker=False)
    from order_saga import HOLD_SAGA

    client.register(HOLD_SAGA)
    procs: list[subprocess.Popen[bytes]] = []

    async def running() -> int:
        return (await client.store.counts()).get("running", 0)

    try:
        procs.append(spawn_worker(url, n + 100))
        await enqueue(client, "Hold", n, {"seconds": 30.0})
        await poll_until(running, n)
        await asyncio.sleep(0.5)  # every saga inside its waiting step
        procs[0].kill()
        killed = time.time()
        procs[0].wait()
        procs.append(spawn_worker(url, n + 100))
        await poll_until(lambda: resumed_since(url, killed), n)
        return time.time() - killed
    finally:
        stop(procs)
        await client.close()


async def resumed_since(url: str, moment: float) -> int:
    """Sagas with a journal entry written after ``moment``."""
    import asyncpg

    base, schema = url.split("?schema=")
    conn = await asyncpg.connect(base, server_settings={"search_path": schema})
    try:
        query = "SELECT count(DISTINCT saga_id) FROM sagakit_journal WHERE at > $1"
        return int(await conn.fetchval(query, moment))
    finally:
        await conn.close()


async def poll_until(count: Callable[[], Awaitable[int]], target: int) -> None:
    """Wait until ``count()`` reaches ``target``, asking the database every 20 ms."""
    while await count() < target:  # noqa: ASYNC110 - the database has no event to wait on
        await asyncio.sleep(0.02)


async def main(args: argparse.Namespace) -> None:
    console = Console()
    table = Table(title="sagakit worker processes on PostgreSQL")
    for col in ("measurement", "figure", "ratio"):
        table.add_column(col, justify="right")
    console.print(f"· scaling: {args.n} order sagas, 1 worker")
    one = await scaling(args.pg, 1, args.n)
    console.print(f"· scaling: {args.n} order sagas, 4 workers")
    four = await scaling(args.pg, 4, args.n)
    table.add_row("1 worker", f"{one:,.0f} sagas/s", "")
    table.add_row("4 workers", f"{four:,.0f} sagas/s", f"{four / one:.2f}x one worker")
    console.print(f"· recovery: {args.in_flight} sagas in flight, SIGKILL, new worker")
    took = await recovery(args.pg, args.in_flight)
    table.add_row(f"{args.in_flight} in flight resumed after SIGKILL", f"{took:.2f} s", "")
    console.print(table)
    console.print(
        "Scaling counts from the workers' spawn (process start included) to the last saga's "
        "end. Recovery counts from the SIGKILL to the last saga's first new journal entry."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--n", type=int, default=6000, help="sagas for the scaling figure")
    parser.add_argument("--in-flight", type=int, default=1000, help="sagas for recovery")
    asyncio.run(main(parser.parse_args()))
