"""What the remote and the choreographed order examples share to run: a broker namespace of
their own, the subprocesses (or in-process tasks) of a run, the audit of the sagas afterwards,
the summary table and the command-line helpers.

Not an example itself: :mod:`sagakit.examples.remote_order` and
:mod:`sagakit.examples.choreographed_order` run through it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from rich.console import Console
from rich.table import Table

from sagakit import App
from sagakit.codec import decode
from sagakit.demo import Observer, ProgressObserver, QuietObserver
from sagakit.errors import BrokerError, DemoError, SagaNotFound
from sagakit.examples.order_fulfillment import STEPS, Simulation
from sagakit.handle import SagaInfo
from sagakit.journal import Entry, Kind, SagaState, project
from sagakit.ledger import Ledger, LedgerReport
from sagakit.messaging import open_broker
from sagakit.messaging.options import split_options

SETTLED = frozenset({SagaState.COMPLETED, SagaState.FAILED, SagaState.NEEDS_ATTENTION})
DEMO_SIMULATION = Simulation(
    decline_rate=0.2, shipment_failure_rate=0.15, glitch_rate=0.15, latency=0.02
)
log = logging.getLogger(__name__)


# -- the broker namespace of a run -------------------------------------------------------------


def with_prefix(url: str) -> tuple[str, bool]:
    """``url`` with a broker namespace of its own (``?prefix=``), and whether it was added."""
    if "prefix" in dict(parse_qsl(urlsplit(url).query)):
        return url, False
    sep = "&" if urlsplit(url).query else ("" if url.endswith("?") else "?")
    return f"{url}{sep}prefix=run{uuid.uuid4().hex[:10]}", True


async def declare_queues(url: str, queues: Iterable[tuple[str, str]]) -> None:
    """Make the durable subscriptions (topic, group) of a run exist before anything is sent,
    so that no message waits for a process that has not subscribed yet; raise
    :class:`DemoError` with the reason if the broker does not answer."""
    broker = open_broker(url)
    try:
        await broker.connect()
        for topic, group in queues:
            await broker.declare(topic, group)
    except (BrokerError, ImportError) as exc:
        raise DemoError(f"cannot use the broker: {exc}") from exc
    finally:
        await broker.close()


async def forget_namespace(url: str, queues: Iterable[tuple[str, str]]) -> None:
    """Delete what a run left on the broker under its prefix (best effort): the RabbitMQ
    queues ``<prefix>.<group>.<topic>`` and exchange, the JetStream stream, the Redis streams."""
    driver_url, options = split_options(url)
    prefix = options.prefix
    try:
        await delete_namespace(driver_url, prefix, (f"{prefix}.{g}.{t}" for t, g in queues))
    except Exception as exc:  # leftovers are harmless: another run uses another prefix
        log.warning("could not delete broker namespace %s: %s", prefix, exc)


async def delete_namespace(url: str, prefix: str, queues: Iterable[str] = ()) -> None:
    """Delete the broker objects named by ``prefix`` on the broker at ``url`` (a driver URL,
    without sagakit's options): the RabbitMQ ``queues`` (full names) and exchange, the
    JetStream stream, the Redis streams. Driver errors propagate."""
    scheme = urlsplit(url).scheme
    if scheme in ("amqp", "amqps"):
        import aio_pika

        connection = await aio_pika.connect(url, timeout=5)
        async with connection:
            channel = await connection.channel()
            for queue in queues:
                await channel.queue_delete(queue)
            await channel.exchange_delete(prefix)
    elif scheme in ("nats", "tls"):
        import nats
        import nats.js.errors

        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(prefix)
        finally:
            await nc.close()
    elif scheme in ("redis", "rediss"):
        from redis.asyncio import Redis

        client = Redis.from_url(url)
        try:
            keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


# -- the processes of a run --------------------------------------------------------------------


class Fleet(Protocol):
    """The processes (or in-process tasks) of a run."""

    async def start(self) -> None: ...

    def check(self) -> None:
        """Raise :class:`DemoError` if a part stopped on its own."""

    async def stop(self) -> None: ...


@dataclass
class Child:
    """One subprocess of a run, its output in a log file of the working directory."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        # S603: this interpreter running this package's own module with our arguments.
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT)  # noqa: S603

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(f"{self.name} exited on its own (code {self.proc.returncode}); "
                            f"its log {self.log_path}:\n{self.tail()}")  # fmt: skip

    async def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()

    def tail(self, limit: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-limit:]


@dataclass
class Processes:
    """Subprocesses started in order and stopped in reverse order."""

    children: list[Child]
    observer: Observer = field(default_factory=QuietObserver)

    async def start(self) -> None:
        for child in self.children:
            child.start()
            pid = child.proc.pid if child.proc else "?"
            self.observer.event(f"started {child.name} (pid {pid})")

    def check(self) -> None:
        for child in self.children:
            child.check()

    async def stop(self) -> None:
        for child in reversed(self.children):
            await child.stop()
        self.observer.event(f"stopped {len(self.children)} processes (SIGTERM)")


def module_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def sim_args(sim: Simulation) -> list[str]:
    return ["--decline-rate", str(sim.decline_rate), "--shipment-failure-rate",
            str(sim.shipment_failure_rate), "--glitch-rate", str(sim.glitch_rate),
            "--latency", str(sim.latency)]  # fmt: skip


def prepare_workdir(workdir: Path | None, files: Sequence[str]) -> Path:
    """The working directory, created, without the files of an earlier run."""
    where = (workdir or Path(tempfile.mkdtemp(prefix="sagakit-run-"))).resolve()
    where.mkdir(parents=True, exist_ok=True)
    for name in files:
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{where / name}{suffix}").unlink(missing_ok=True)
    return where


# -- what a run did ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """What a run did, checked against the ledger and the journals."""

    title: str
    orders: int
    states: Counter[SagaState]
    reasons: Mapping[SagaState, Counter[str]]  # why sagas failed or need attention
    ledger: LedgerReport
    mismatches: list[str]
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # extra information
    hint: str = ""

    @property
    def unsettled(self) -> int:
        return self.orders - sum(self.states.get(s, 0) for s in SETTLED)

    def violations(self) -> list[str]:
        """Every broken promise, as a sentence; empty when all is well."""
        found = []
        if self.unsettled:
            found.append(f"{self.unsettled} sagas did not settle")
        if self.ledger.applied_twice:
            found.append(f"effects applied twice: {self.ledger.applied_twice[:5]}")
        if self.ledger.unbalanced:
            found.append(f"ledger does not match saga states: {self.ledger.unbalanced[:5]}")
        if self.mismatches:
            found.append(f"saga rows differ from their journal: {self.mismatches[:5]}")
        return found


def _ok(value: int) -> str:
    return "0 ✓" if value == 0 else f"{value} ✗"


def _reasons(table: Table, reasons: Counter[str] | None) -> None:
    for reason, n in sorted((reasons or Counter()).items()):
        table.add_row(f"  {reason}", str(n), "")


def render(summary: Summary, console: Console) -> None:
    """Print the summary table (and where to look next)."""
    console.print(summary.title, soft_wrap=True)
    table = Table("outcome", "count", "")
    table.columns[1].justify = "right"
    count = summary.states.get
    table.add_row("completed", str(count(SagaState.COMPLETED, 0)), "every step done")
    table.add_row("compensated (failed)", str(count(SagaState.FAILED, 0)),
                  "undone in reverse order")  # fmt: skip
    _reasons(table, summary.reasons.get(SagaState.FAILED))
    table.add_row("needs_attention", str(count(SagaState.NEEDS_ATTENTION, 0)), "")
    _reasons(table, summary.reasons.get(SagaState.NEEDS_ATTENTION))
    table.add_row("not settled", _ok(summary.unsettled), "must be 0")
    for row in summary.rows:
        table.add_row(*row)
    table.add_row("effects applied twice", _ok(len(summary.ledger.applied_twice)), "must be 0")
    table.add_row("orders the ledger disagrees with", _ok(len(summary.ledger.unbalanced)),
                  "must be 0")  # fmt: skip
    table.add_row("saga rows ≠ their journal", _ok(len(summary.mismatches)), "must be 0")
    console.print(table)
    if summary.hint:
        console.print(summary.hint, soft_wrap=True)


async def settle(
    reader: App,
    ids: Sequence[str],
    *,
    timeout: float,
    fleet: Fleet,
    observer: Observer,
    done: frozenset[SagaState] = SETTLED,
) -> None:
    """Wait until every saga of ``ids`` is in ``done`` (or ``timeout`` passed)."""
    waiting, deadline = set(ids), time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        fleet.check()
        for saga_id in list(waiting):
            with contextlib.suppress(SagaNotFound):  # a tracked saga appears with its first event
                if (await reader.get(saga_id)).state in done:
                    waiting.discard(saga_id)
        observer.update(len(ids) - len(waiting), len(ids))
        if waiting:
            await asyncio.sleep(0.2)


@dataclass(frozen=True, slots=True, kw_only=True)
class Audit:
    """Sagas read back after a run: their rows and journals, the ledger's verdict, the sagas
    whose row is not the projection of their journal, and why the unsuccessful ones are so."""

    infos: dict[str, SagaInfo]
    journals: dict[str, list[Entry]]
    ledger: LedgerReport
    mismatches: list[str]
    reasons: dict[SagaState, Counter[str]]

    @property
    def states(self) -> Counter[SagaState]:
        return Counter(info.state for info in self.infos.values())

    def count(self, *kinds: Kind) -> int:
        """Journal entries of ``kinds`` over every saga."""
        return sum(e.kind in kinds for entries in self.journals.values() for e in entries)


async def audit(
    reader: App,
    ids: Sequence[str],
    ledger: Ledger,
    reason: Callable[[SagaInfo, list[Entry]], str],
) -> Audit:
    """Read every saga of ``ids`` and its journal back and check them against ``ledger``;
    ``reason`` says why a failed (or parked) saga is so."""
    infos, journals, mismatches = {}, {}, []
    reasons: dict[SagaState, Counter[str]] = {}
    for saga_id in ids:
        with contextlib.suppress(SagaNotFound):  # a tracked flow whose first event was lost
            info = infos[saga_id] = await reader.get(saga_id)
            entries = journals[saga_id] = await reader.journal(saga_id)
            p = project(entries)
            if (info.state, info.current_step, info.output, info.error) != (
                p.state, p.current_step, decode(p.output), p.error
            ) or [e.index for e in entries] != list(range(len(entries))):  # fmt: skip
                mismatches.append(saga_id)
            if info.state in (SagaState.FAILED, SagaState.NEEDS_ATTENTION):
                reasons.setdefault(info.state, Counter())[reason(info, entries)] += 1
    states = {i: info.state for i, info in infos.items()}
    return Audit(infos=infos, journals=journals, ledger=ledger.check(states, STEPS, journals),
                 mismatches=mismatches, reasons=reasons)  # fmt: skip


# -- the command line --------------------------------------------------------------------------


def add_simulation_options(parser: argparse.ArgumentParser) -> None:
    sim = DEMO_SIMULATION
    parser.add_argument("--decline-rate", type=float, default=sim.decline_rate)
    parser.add_argument("--shipment-failure-rate", type=float, default=sim.shipment_failure_rate)
    parser.add_argument("--glitch-rate", type=float, default=sim.glitch_rate)
    parser.add_argument("--latency", type=float, default=sim.latency,
                        help="seconds a service call takes at most")  # fmt: skip


def simulation_of(args: argparse.Namespace) -> Simulation:
    return Simulation(decline_rate=args.decline_rate, latency=args.latency,
                      shipment_failure_rate=args.shipment_failure_rate,
                      glitch_rate=args.glitch_rate)  # fmt: skip


async def wait_for_sigterm() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_and_report(go: Callable[[Observer], Coroutine[Any, Any, Summary]]) -> int:
    """Run with a progress bar, print the summary; exit 0 if every promise held."""
    logging.basicConfig(level=logging.ERROR)  # the services log to their own files
    console = Console(highlight=False)
    with ProgressObserver(console) as observer:
        try:
            summary = asyncio.run(go(observer))
        except DemoError as exc:
            observer.stop()
            console.print(f"error: {exc}", markup=False, soft_wrap=True)
            return 2
    render(summary, console)
    problems = summary.violations()
    for problem in problems:
        console.print(f"FAILED: {problem}", markup=False)
    return 1 if problems else 0
