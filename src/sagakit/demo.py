"""``sagakit demo``: order fulfilment in a worker process that is SIGKILLed mid-run.

The demo starts the orders from this process (``App(worker=False)``), runs a worker
subprocess (``python -m sagakit worker --app sagakit.examples.order_fulfillment:app``), kills
it with SIGKILL when a given share of the sagas has settled, restarts it, and once every saga
has settled checks the outcome against the services' ledger: nothing applied twice, no
committed step run again, every failed order fully compensated, every saga row equal to the
projection of its journal. The crash tests drive the same machinery with more kills.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sagakit.app import App
from sagakit.codec import decode
from sagakit.errors import DemoError
from sagakit.examples import order_fulfillment as example
from sagakit.handle import SagaInfo
from sagakit.journal import TERMINAL, Entry, Kind, SagaState, project
from sagakit.ledger import Ledger, LedgerReport
from sagakit.store import DEFAULT_URL, SqliteStore, open_store, sqlite_store

WORKER_APP = "sagakit.examples.order_fulfillment:app"
SETTLED = (*TERMINAL, SagaState.NEEDS_ATTENTION)


def kill_points(kills: int) -> tuple[float, ...]:
    """Shares of settled sagas at which to kill the worker: 40 % for one kill, else spread
    evenly between 15 % and 85 %."""
    if kills <= 0:
        return ()
    if kills == 1:
        return (0.4,)
    return tuple(0.15 + 0.7 * i / (kills - 1) for i in range(kills))


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    """What to run.

    Args:
        url: sagakit's database; its old content is deleted first.
        ledger_path: the services' ledger (default: next to the database); deleted first.
        orders: orders to start.
        kill_at: shares of settled sagas (0..1) at which the worker is SIGKILLed and restarted.
        kill_jitter: at most this many seconds of random delay before each kill.
        decline_rate, shipment_failure_rate, glitch_rate, latency, concurrency: the
            simulation, see :func:`sagakit.examples.order_fulfillment.create_app`.
        timeout: seconds to wait for every saga to settle.
    """

    url: str = DEFAULT_URL
    ledger_path: Path | None = None
    orders: int = 200
    kill_at: Sequence[float] = (0.4,)
    kill_jitter: float = 0.0
    decline_rate: float = 0.1
    shipment_failure_rate: float = 0.05
    glitch_rate: float = 0.05
    latency: float = 0.2
    concurrency: int = 32
    timeout: float = 120.0

    @property
    def db_path(self) -> Path:
        """sagakit's database file, absolute."""
        return Path(sqlite_store(open_store(self.url), "sagakit demo").path).resolve()

    @property
    def ledger(self) -> Path:
        """The ledger file, absolute."""
        return (self.ledger_path or example.default_ledger_path(self.db_path)).resolve()

    def settings(self) -> dict[str, Any]:
        """The keyword arguments of the example's ``create_app`` (but ``url`` and ``worker``)."""
        return {
            "ledger_path": self.ledger,
            "decline_rate": self.decline_rate,
            "shipment_failure_rate": self.shipment_failure_rate,
            "glitch_rate": self.glitch_rate,
            "latency": self.latency,
            "concurrency": self.concurrency,
        }

    def create_app(self, *, worker: bool | None) -> App:
        """The example App on this demo's files, with its simulation settings."""
        return example.create_app(f"sqlite:///{self.db_path}", worker=worker, **self.settings())

    def worker_env(self) -> dict[str, str]:
        """The environment variables that make the worker's App this demo's App."""
        return example.environment(url=f"sqlite:///{self.db_path}", **self.settings())


class Observer(Protocol):
    """Told what happens while the demo runs (the CLI draws a progress bar)."""

    def update(self, settled: int, total: int) -> None:
        """``settled`` of ``total`` sagas are completed, failed or parked."""

    def event(self, message: str) -> None:
        """Something happened (a worker started or was killed)."""


class QuietObserver:
    """An observer that keeps the events and draws nothing."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def update(self, settled: int, total: int) -> None:
        """Ignore progress."""

    def event(self, message: str) -> None:
        """Keep the event in :attr:`events`."""
        self.events.append(message)


class WorkerProcess:
    """``python -m sagakit worker`` in a subprocess, its output kept in a temporary file."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()

    @property
    def pid(self) -> int | None:
        """The running worker's process id."""
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        """Start a worker process."""
        argv = [sys.executable, "-m", "sagakit", "worker", "--app", WORKER_APP]
        # S603: a fixed argv, this interpreter running sagakit's own worker.
        self.proc = subprocess.Popen(  # noqa: S603
            argv, env={**os.environ, **self.env}, stdout=self.log, stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        """SIGKILL the worker and reap it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def check(self) -> None:
        """Raise :class:`DemoError` if the worker exited on its own."""
        if self.proc is not None and self.proc.poll() is not None:
            code, self.proc = self.proc.returncode, None
            raise DemoError(f"the worker exited on its own (code {code}):\n{self.output()}")

    async def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the worker gracefully with SIGTERM (SIGKILL after ``timeout``)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise DemoError(
                f"the worker ignored SIGTERM for {timeout} s:\n{self.output()}"
            ) from None

    def output(self, limit: int = 4000) -> str:
        """The last ``limit`` characters the worker printed."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:]

    def close(self) -> None:
        """Kill the worker if it still runs and drop its output."""
        self.kill()
        self.log.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoReport:
    """The outcome of a demo run."""

    orders: int
    states: dict[SagaState, int]
    failed_at: dict[str, int]
    kills: int
    ledger: LedgerReport
    mismatches: list[str]
    elapsed: float
    example_failed: str | None = None

    def count(self, state: SagaState) -> int:
        """How many sagas ended in ``state``."""
        return self.states.get(state, 0)

    @property
    def unsettled(self) -> int:
        """Sagas not completed, failed, cancelled or parked (0 unless the demo timed out)."""
        return self.orders - sum(self.count(s) for s in SETTLED)

    def violations(self) -> list[str]:
        """Every broken invariant, as a sentence; empty when all is well."""
        found = []
        if self.unsettled:
            found.append(f"{self.unsettled} sagas did not settle")
        if self.ledger.applied_twice:
            found.append(f"effects applied twice: {self.ledger.applied_twice[:5]}")
        if self.ledger.committed_reruns:
            found.append(f"{self.ledger.committed_reruns} committed steps ran again")
        if self.ledger.unbalanced:
            found.append(f"ledger does not match saga states: {self.ledger.unbalanced[:5]}")
        if self.mismatches:
            found.append(f"saga rows differ from their journal: {self.mismatches[:5]}")
        return found


async def prepare(config: DemoConfig) -> None:
    """Delete the previous demo's database and ledger, refusing to touch a database that a
    worker is using or that holds sagas the demo did not make."""
    db, ledger = config.db_path, config.ledger
    if not db.parent.is_dir():
        raise DemoError(f"cannot create {db}: the directory {db.parent} does not exist")
    store = SqliteStore(str(db))
    store.acquire_ownership()  # DatabaseOwned if a worker runs on it
    store.release_ownership()
    if db.exists() and not ledger.exists():
        async with App(f"sqlite:///{db}", worker=False) as app:
            if await app.list(limit=1):
                raise DemoError(
                    f"{db} holds sagas that `sagakit demo` did not create (it has no ledger "
                    f"{ledger.name}); remove it yourself or run the demo with --db elsewhere"
                )
    _remove(db, ledger)
    Ledger(ledger).setup()  # first, so that a later run knows the database is the demo's


def _remove(*databases: Path) -> None:
    for base in databases:
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{base}{suffix}").unlink(missing_ok=True)


async def enqueue(app: App, orders: int) -> None:
    """Start ``orders`` sample orders (idempotent: the order id is the key)."""
    await asyncio.gather(
        *(
            app.start(example.SAGA_TYPE, order, idempotency_key=order.order_id)
            for order in map(example.sample_order, range(1, orders + 1))
        )
    )


async def settled(app: App) -> int:
    """How many sagas are completed, failed, cancelled or need attention."""
    counts = await app.store.counts()
    return sum(counts.get(s.value, 0) for s in SETTLED)


async def drive(app: App, worker: WorkerProcess, config: DemoConfig, observer: Observer) -> int:
    """Run the worker until every saga settled, killing it at ``config.kill_at``; return the
    number of kills. The worker is left running."""
    total, kills, deadline = config.orders, 0, time.monotonic() + config.timeout
    pending = sorted(config.kill_at)
    worker.start()
    observer.event(f"worker started (pid {worker.pid})")
    while (done := await settled(app)) < total and time.monotonic() < deadline:
        observer.update(done, total)
        if pending and done >= pending[0] * total:
            pending.pop(0)
            await asyncio.sleep(random.uniform(0, config.kill_jitter))
            pid, done = worker.pid, await settled(app)
            worker.kill()
            kills += 1
            worker.start()
            observer.event(
                f"SIGKILL worker (pid {pid}) at {done}/{total}; restarted (pid {worker.pid})"
            )
            continue
        worker.check()
        await asyncio.sleep(0.05)
    observer.update(done, total)
    return kills


@dataclass(frozen=True, slots=True, kw_only=True)
class Audit:
    """Every saga of a database checked against its journal and the services' ledger.

    Attributes:
        states: saga id -> state.
        failed_at: step where failed sagas failed -> how many.
        ledger: the ledger's verdict.
        mismatches: ids of sagas whose row is not the projection of their journal.
        gaps: ids of sagas whose journal lost an entry (its indexes are not 0, 1, 2, ...).
        journals: saga id -> journal entries.
        example_failed: a failed saga worth a look with `sagakit show`.
    """

    states: dict[str, SagaState]
    failed_at: dict[str, int]
    ledger: LedgerReport
    mismatches: list[str]
    gaps: list[str]
    journals: dict[str, list[Entry]]
    example_failed: str | None


async def audit(app: App, ledger: Ledger, steps: Sequence[str] = example.STEPS) -> Audit:
    """Read every saga of ``app``'s database and its journal, and check them against
    ``ledger`` (any backend: the ledger compares times, it does not read the database)."""
    infos: list[SagaInfo] = []
    while batch := await app.list(limit=500, offset=len(infos)):
        infos.extend(batch)
    failed_at: Counter[str] = Counter()
    mismatches: list[str] = []
    gaps: list[str] = []
    examples: dict[str, str] = {}
    journals: dict[str, list[Entry]] = {}
    for info in infos:
        entries = journals[info.id] = await app.journal(info.id)
        p = project(entries)
        row = (info.state, info.current_step, info.output, info.error)
        if row != (p.state, p.current_step, decode(p.output), p.error):
            mismatches.append(info.id)
        if [e.index for e in entries] != list(range(len(entries))):
            gaps.append(info.id)
        if info.state is SagaState.FAILED:
            step = next((str(e.step) for e in entries if e.kind is Kind.STEP_FAILED), "other")
            failed_at[step] += 1
            examples.setdefault(step, info.id)
    states = {i.id: i.state for i in infos}
    return Audit(
        states=states,
        failed_at=dict(failed_at),
        ledger=ledger.check(states, steps, journals),
        mismatches=mismatches,
        gaps=gaps,
        journals=journals,
        # A saga that failed late shows the most compensations in `sagakit show`.
        example_failed=examples.get("create_shipment") or next(iter(examples.values()), None),
    )


async def collect(app: App, config: DemoConfig, kills: int, elapsed: float) -> DemoReport:
    """Read every saga and its journal, and check them against the ledger."""
    found = await audit(app, Ledger(config.ledger))
    return DemoReport(
        orders=config.orders,
        states=dict(Counter(found.states.values())),
        failed_at=found.failed_at,
        kills=kills,
        ledger=found.ledger,
        mismatches=found.mismatches,
        elapsed=elapsed,
        example_failed=found.example_failed,
    )


async def run_demo(config: DemoConfig, observer: Observer | None = None) -> DemoReport:
    """Run the demo end to end and return its report (see the module docstring)."""
    observer = observer or QuietObserver()
    await prepare(config)
    started = time.monotonic()
    worker = WorkerProcess(config.worker_env())
    try:
        async with config.create_app(worker=False) as app:
            await enqueue(app, config.orders)
            observer.event(f"started {config.orders} orders")
            kills = await drive(app, worker, config, observer)
            await worker.stop()
            observer.event("worker stopped (SIGTERM)")
            return await collect(app, config, kills, time.monotonic() - started)
    finally:
        worker.close()


# -- presentation (rich) -----------------------------------------------------------------------


class ProgressObserver:
    """A rich progress bar of settled sagas, with the demo's events printed above it."""

    def __init__(self, console: Console) -> None:
        self._bar = Progress(
            TextColumn("[bold]orders"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("settled"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = self._bar.add_task("orders", total=None)

    def __enter__(self) -> ProgressObserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop drawing the bar (it stays on screen)."""
        self._bar.stop()

    def update(self, settled: int, total: int) -> None:
        """Move the bar."""
        self._bar.start()  # on first use, so that a demo refused at once draws nothing
        self._bar.update(self._task, completed=settled, total=total)

    def event(self, message: str) -> None:
        """Print the event above the bar."""
        self._bar.start()
        self._bar.console.print(f"[dim]·[/] {escape(message)}")


def render_report(report: DemoReport, console: Console, *, db_option: str = "") -> None:
    """Print the demo's summary table and where to look next."""
    kills = f"{report.kills} SIGKILL{'' if report.kills == 1 else 's'}"
    title = f"{report.orders} orders, {kills}, {report.elapsed:.1f} s"
    table = Table("outcome", "count", "", title=title, title_justify="left")
    table.columns[1].justify = "right"
    for row in _rows(report):
        table.add_row(*row)
    console.print(table)
    example_id = report.example_failed or "<id>"
    hint = f"try: sagakit list{db_option}  /  sagakit show {example_id}{db_option}"
    console.print(hint, highlight=False)


def _rows(report: DemoReport) -> list[tuple[str, str, str]]:
    def check(value: int) -> str:
        return "[green]0 ✓[/]" if value == 0 else f"[bold red]{value} ✗[/]"

    ledger = report.ledger
    rows = [
        ("completed", str(report.count(SagaState.COMPLETED)), "all four steps"),
        ("compensated (failed)", str(report.count(SagaState.FAILED)), "undone in reverse order"),
        *((f"  at {s}", str(n), _CAUSES.get(s, "")) for s, n in sorted(report.failed_at.items())),
        ("needs_attention", str(report.count(SagaState.NEEDS_ATTENTION)), ""),
        ("step bodies re-run after recovery", str(ledger.reruns), "deduplicated by the ledger"),
        ("effects applied twice", check(len(ledger.applied_twice)), "must be 0"),
        ("committed steps re-run", check(ledger.committed_reruns), "must be 0"),
        ("orders the ledger disagrees with", check(len(ledger.unbalanced)), "must be 0"),
        ("saga rows ≠ their journal", check(len(report.mismatches)), "must be 0"),
    ]
    if report.unsettled:
        rows.insert(-5, ("not settled", check(report.unsettled), "timed out"))
    return rows


_CAUSES = {
    "process_payment": "declined; reservation released",
    "create_shipment": "no carrier; refunded, released",
}
