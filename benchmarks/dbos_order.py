"""The order saga of benchmarks/run.py written for DBOS Transact, measured the same way.

The saga is an async ``@DBOS.workflow()`` calling four async ``@DBOS.step()`` functions
(reserve_inventory, process_payment, create_shipment, send_confirmation). Every 10th order is
declined at payment: the step raises, and the workflow runs the compensations of the completed
steps, themselves DBOS steps, in reverse order and re-raises, so the workflow ends in DBOS's
ERROR state as a failed sagakit saga ends ``failed``. This is the saga pattern as DBOS leaves it
to the application: plain try/except in the workflow body, every action and undo a step.

DBOS keeps one global instance per process (``DBOS(config=...)``, ``DBOS.launch()``,
``DBOS.destroy()``), so each measurement runs in a process of its own::

    .venv/bin/python benchmarks/dbos_order.py --url sqlite --n 300 --in-flight 1
    .venv/bin/python benchmarks/dbos_order.py \\
        --url postgresql://postgres@127.0.0.1:5432/sagakit_bench_dbos --n 2000 --in-flight 64

prints one JSON line ``{"rate": ..., ...}``; ``measure_dbos_subprocess`` does that from Python.
``--url sqlite`` uses a fresh temporary file. A PostgreSQL database whose name starts with
``sagakit_bench`` is dropped before and after the run (DBOS creates it on launch); any other
name is used as it is and left in place. DBOS's default durability settings are kept: its
default pool, SQLite's default journal and ``synchronous=FULL``, PostgreSQL's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dbos import DBOS, DBOSConfig

BENCH_DB_PREFIX = "sagakit_bench"
WARM_UP = 50


class Declined(Exception):
    pass


@DBOS.step()
async def reserve_inventory(order: dict[str, Any]) -> dict[str, Any]:
    return {"reservation": order["id"]}


@DBOS.step()
async def release_inventory(order: dict[str, Any], result: Any) -> None:
    return None


@DBOS.step()
async def process_payment(order: dict[str, Any]) -> dict[str, Any]:
    if order["id"] % 10 == 0:
        raise Declined("card declined")
    return {"payment": order["id"]}


@DBOS.step()
async def refund_payment(order: dict[str, Any], result: Any) -> None:
    return None


@DBOS.step()
async def create_shipment(order: dict[str, Any]) -> dict[str, Any]:
    return {"shipment": order["id"]}


@DBOS.step()
async def cancel_shipment(order: dict[str, Any], result: Any) -> None:
    return None


@DBOS.step()
async def send_confirmation(order: dict[str, Any]) -> str:
    return "sent"


@DBOS.step()
async def cancel_notice(order: dict[str, Any], result: Any) -> None:
    return None


SAGA: list[tuple[Callable[..., Awaitable[Any]], Callable[..., Awaitable[None]]]] = [
    (reserve_inventory, release_inventory),
    (process_payment, refund_payment),
    (create_shipment, cancel_shipment),
    (send_confirmation, cancel_notice),
]


@DBOS.workflow()
async def order_saga(order: dict[str, Any]) -> str:
    """Run the steps in order; on a failure, compensate the completed ones in reverse."""
    completed: list[tuple[Callable[..., Awaitable[None]], Any]] = []
    try:
        for action, compensate in SAGA:
            completed.append((compensate, await action(order)))
    except Exception:
        for compensate, result in reversed(completed):
            await compensate(order, result)
        raise
    return "completed"


async def _drive(n: int, in_flight: int) -> float:
    """Run ``n`` workflows with at most ``in_flight`` at once; return workflows per second."""
    orders = iter(range(1, n + 1))

    async def lane() -> None:
        for i in orders:
            handle = await DBOS.start_workflow_async(
                order_saga, {"id": i, "sku": "BOOK-1", "amount": "19.99"}
            )
            with contextlib.suppress(Declined):  # compensated: done as well
                await handle.get_result()

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return n / (time.perf_counter() - start)


def _quiet_declined(record: logging.LogRecord) -> bool:
    """Drop DBOS's ERROR log (with traceback) for a workflow that ended on the expected decline.

    DBOS logs every workflow that raises; sagakit logs nothing for a compensated saga. The log
    record is still made, only not formatted and written, so the terminal stays readable and
    the figures are not about stderr. Any other error is logged as usual.
    """
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, Declined)


def _drop_database(database_url: str, name: str) -> None:
    """``DROP DATABASE IF EXISTS name WITH (FORCE)``, run on the server's ``postgres`` database."""
    import psycopg  # a dependency of dbos
    from psycopg import sql
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(drivername="postgresql", database="postgres")
    conninfo = url.render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _bench_database(database_url: str) -> str | None:
    """The database name if it is a throwaway bench database we may drop, else None."""
    from sqlalchemy.engine import make_url

    name = make_url(database_url).database or ""
    return name if name.startswith(BENCH_DB_PREFIX) else None


def measure_dbos(database_url: str, n: int, in_flight: int) -> float:
    """Workflows per second of the order saga on DBOS (completed and compensated both count).

    ``database_url`` is ``postgresql://...`` or ``sqlite:///path`` (or ``sqlite`` for a temporary
    file). Launches DBOS, warms up with ``min(n, 50)`` workflows, times ``n`` and destroys DBOS;
    DBOS is global state, so call this once per process (see ``measure_dbos_subprocess``).
    """
    tmpdir: tempfile.TemporaryDirectory[str] | None = None
    if database_url in ("sqlite", "sqlite://", "sqlite:///"):
        tmpdir = tempfile.TemporaryDirectory(prefix="sagakit-bench-dbos-")
        database_url = f"sqlite:///{Path(tmpdir.name) / 'dbos.sqlite'}"
    drop = _bench_database(database_url) if database_url.startswith("postgres") else None
    if drop:
        _drop_database(database_url, drop)
    config: DBOSConfig = {
        "name": "sagakit-bench",
        "system_database_url": database_url,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    logging.getLogger("dbos").addFilter(_quiet_declined)
    try:
        DBOS.launch()

        async def run() -> float:
            await _drive(min(n, WARM_UP), in_flight)
            return await _drive(n, in_flight)

        return asyncio.run(run())
    finally:
        DBOS.destroy()
        if drop:
            _drop_database(database_url, drop)
        if tmpdir is not None:
            tmpdir.cleanup()


def measure_dbos_subprocess(database_url: str, n: int, in_flight: int) -> float:
    """``measure_dbos`` in a fresh Python process, so each run has its own DBOS instance."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--url", database_url,
         "--n", str(n), "--in-flight", str(in_flight)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"DBOS benchmark failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["rate"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="postgresql://... or sqlite[:///path]")
    parser.add_argument("--n", type=int, default=300, help="workflows timed")
    parser.add_argument("--in-flight", type=int, default=1, help="workflows at once")
    args = parser.parse_args()
    rate = measure_dbos(args.url, args.n, args.in_flight)
    backend = "sqlite" if args.url.startswith("sqlite") else "postgresql"
    print(json.dumps({"rate": rate, "backend": backend, "n": args.n, "in_flight": args.in_flight}))


if __name__ == "__main__":
    main()
