"""sagakit benchmarks: the 4-step order saga against a plain-function floor.

Run with ``make bench`` (or ``.venv/bin/python benchmarks/run.py --help``). Prints sagas/s on
SQLite and PostgreSQL, sequentially and with 16 and 64 sagas in flight, the per-step overhead
against plain function calls (the floor), and the same saga on DBOS Transact on the same
databases, all as ratios measured in this one run. Step bodies are trivial and 10 % of orders
are declined at payment, so the figures are the engine's own cost: journal writes, commits,
scheduling and encoding.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from order_saga import STEPS
from sagakit.bench import bench, drive, plain_saga, scratch_schema


async def run_floor(n: int, in_flight: int) -> float:
    return (await drive(n, in_flight, plain_saga)).rate


async def run_sagakit(n: int, in_flight: int, url: str, durability: str = "full") -> float:
    return (await bench(url, n, in_flight, durability=durability)).sagas_per_second


@dataclass(frozen=True, slots=True)
class Row:
    backend: str
    in_flight: int
    sagakit: float
    floor: float
    dbos: float | None


async def measure(args: argparse.Namespace, backend: str, in_flight: int, workdir: Path) -> Row:
    n = args.sequential if in_flight == 1 else args.concurrent
    floor = await run_floor(n, in_flight)
    if backend == "sqlite":
        rate = await run_sagakit(n, in_flight, f"sqlite:///{workdir / f'b{in_flight}.db'}")
    else:
        async with scratch_schema(args.pg) as url:
            rate = await run_sagakit(n, in_flight, url)
    dbos = None
    if args.dbos:  # needs the bench extra (make bench installs it)
        from dbos_order import measure_dbos_subprocess

        dbos_n = args.dbos_n if in_flight > 1 else min(n, args.dbos_n)
        target = (
            "sqlite" if backend == "sqlite" else args.pg.rsplit("/", 1)[0] + "/sagakit_bench_dbos"
        )
        dbos = await asyncio.to_thread(measure_dbos_subprocess, target, dbos_n, in_flight)
    return Row(backend, in_flight, rate, floor, dbos)


def report(rows: list[Row]) -> Table:
    table = Table(title="4-step order saga, 10 % declined at payment (compensated)")
    for col in ("backend", "in flight", "sagakit sagas/s", "µs/step added", "vs sequential",
                "floor / sagakit", "DBOS sagas/s", "sagakit / DBOS"):  # fmt: skip
        table.add_column(col, justify="right")
    sequential = {r.backend: r.sagakit for r in rows if r.in_flight == 1}
    for r in rows:
        per_step = (1 / r.sagakit - 1 / r.floor) / STEPS * 1e6 * r.in_flight
        table.add_row(
            r.backend,
            str(r.in_flight),
            f"{r.sagakit:,.0f}",
            f"{per_step:,.0f}",
            f"{r.sagakit / sequential[r.backend]:.1f}x",
            f"{r.floor / r.sagakit:,.0f}x",
            "-" if r.dbos is None else f"{r.dbos:,.0f}",
            "-" if r.dbos is None else f"{r.sagakit / r.dbos:.1f}x",
        )
    return table


async def main(args: argparse.Namespace) -> None:
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="sagakit-bench-"))
    rows: list[Row] = []
    try:
        for backend in args.backends:
            for in_flight in (1, 16, 64):
                console.print(f"· {backend}, {in_flight} in flight", highlight=False)
                rows.append(await measure(args, backend, in_flight, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    console.print(report(rows))
    console.print(
        "µs/step added: wall time per saga minus the plain-function floor's, over 4 steps, "
        "times the sagas in flight (the latency durability adds to one step). Durable commits: "
        "SQLite WAL synchronous=FULL; PostgreSQL synchronous_commit=on. DBOS runs in its own "
        "process with its defaults."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequential", type=int, default=500, help="sagas run one at a time")
    parser.add_argument("--concurrent", type=int, default=3000, help="sagas run concurrently")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--no-dbos", dest="dbos", action="store_false", help="skip DBOS")
    parser.add_argument("--dbos-n", type=int, default=600, help="DBOS workflows per figure")
    asyncio.run(main(parser.parse_args()))
