"""``sagakit bench``: sagas per second on this machine's database (see :mod:`sagakit.bench`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import click
from rich.table import Table

from sagakit.bench import STEPS, BenchResult, bench, scratch_schema
from sagakit.cli import main
from sagakit.cli_base import ExitCode, console, dumps, fail, progress_bar, run

_LEVELS = (1, 16, 64)


def _sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, else None."""
    return Path(url.removeprefix("sqlite:///").split("?")[0]) if url.startswith("sqlite:") else None


async def _measure(
    url: str | None, sagas: int, levels: tuple[int, ...], durability: str
) -> list[BenchResult]:
    results: list[BenchResult] = []
    with progress_bar("sagas", sagas * len(levels)) as advance:
        for in_flight in levels:
            async with _database(url) as target:
                results.append(await bench(target, sagas, in_flight, durability=durability,
                                           progress=lambda: advance(1)))  # fmt: skip
    return results


@contextlib.asynccontextmanager
async def _database(url: str | None) -> AsyncIterator[str]:
    """Where one level runs: a scratch schema of a PostgreSQL ``url``, the SQLite ``url``
    itself, or (no ``url``) a scratch SQLite file removed afterwards."""
    if url is not None and url.startswith("postgres"):
        async with scratch_schema(url) as scratch:
            yield scratch
    elif url is not None:
        yield url
    else:
        workdir = await asyncio.to_thread(tempfile.mkdtemp, prefix="sagakit-bench-")
        try:
            yield f"sqlite:///{Path(workdir) / 'bench.db'}"
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)


def _table(results: list[BenchResult], where: str) -> Table:
    title = f"{STEPS}-step order saga on {where}, every 10th declined and compensated"
    table = Table(title=title, title_justify="left")
    for column in ("in flight", "sagas/s", "p50", "p95", "µs/step added", "floor / sagakit"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r.in_flight),
            f"{r.sagas_per_second:,.0f}",
            f"{r.p50_ms:.1f} ms",
            f"{r.p95_ms:.1f} ms",
            f"{r.us_per_step:,.0f}",
            f"{r.floor_sagas_per_second / r.sagas_per_second:,.0f}x",
        )
    return table


@main.command("bench")
@click.option(
    "--db",
    "url",
    metavar="URL",
    help="Measure on this database instead of a scratch SQLite file: a sqlite:/// path that "
    "does not exist yet (kept afterwards), or a postgresql:// URL (a scratch schema is made "
    "in it and dropped).",
)
@click.option(
    "--sagas",
    type=click.IntRange(min=20),
    default=1000,
    show_default=True,
    help="Sagas measured per level.",
)
@click.option(
    "--in-flight",
    "levels",
    type=click.IntRange(1, 10_000),
    multiple=True,
    help="Sagas run at once; repeat for several levels (default: 1, 16 and 64).",
)
@click.option(
    "--durability",
    type=click.Choice(["full", "normal"]),
    default="full",
    show_default=True,
    help="full fsyncs every commit; normal survives a process crash but not a power loss.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench_command(
    url: str | None, sagas: int, levels: tuple[int, ...], durability: str, as_json: bool
) -> None:
    """Measure sagas per second on this machine: a 4-step order saga with compensations.

    Step bodies do nothing, so the figures are sagakit's own cost (journal writes, durable
    commits, scheduling). Run it on your production database engine to size workers; the
    repository's `make bench` adds comparisons (worker processes, DBOS, brokers).
    """
    path = _sqlite_path(url) if url else None
    if url and path is None and not url.startswith(("postgres://", "postgresql://")):
        fail(f"--db {url!r} is neither sqlite:///PATH nor postgresql://…", ExitCode.USAGE)
    if path is not None and os.path.exists(path):
        fail(
            f"{path} exists; the bench writes thousands of sagas into its database, so give a "
            "path that does not exist yet, or leave --db out for a scratch file",
            ExitCode.USAGE,
        )
    results = run(_measure(url, sagas, levels or _LEVELS, durability))
    if as_json:
        click.echo(dumps([dataclasses.asdict(r) for r in results]))
        return
    where = "PostgreSQL" if url and path is None else "SQLite"
    console().print(_table(results, where))
    click.echo(
        "µs/step added: wall time per saga minus the plain-function floor's, over the steps, "
        "times the sagas in flight. Compare levels and databases within one run: a shared "
        "machine's figures move from run to run."
    )
