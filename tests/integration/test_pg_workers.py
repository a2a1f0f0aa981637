"""Many worker processes on one PostgreSQL database (issue 3), against the real server.

Workers are ``python -m sagakit worker`` subprocesses on a schema of the test's own; a client
``App(url, worker=False)`` starts the sagas and audits them afterwards. The order-fulfilment
example's services keep a ledger (one SQLite file the workers share) that shows whether an
effect was applied twice and whether a step ran after its outcome was committed. The tests
kill, pause, stop and cut off workers, and restart PostgreSQL, while sagas run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg
import pg_worker_apps as apps
import pytest

from sagakit import Kind, SagaState
from sagakit.demo import Audit, audit, enqueue
from sagakit.examples import order_fulfillment as example
from sagakit.ledger import Ledger

pytestmark = pytest.mark.crash

HERE = Path(__file__).resolve().parent
EXAMPLE = "sagakit.examples.order_fulfillment:app"
APPS = "pg_worker_apps:app"
ACTIVE = ["started", "running", "compensating"]
SETTLED = ["completed", "failed", "cancelled", "needs_attention"]
# The example's simulation: some orders declined, some unshippable, some payment glitches.
SIM = {"decline_rate": 0.1, "shipment_failure_rate": 0.05, "glitch_rate": 0.05}


# -- worker processes --------------------------------------------------------------------------


class Worker:
    """A ``python -m sagakit worker`` subprocess; its output goes to a file."""

    def __init__(self, target: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("SAGAKIT_", "PGW_"))}
        path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sagakit", "worker", "--app", target],
                env={**inherited, "PYTHONPATH": path, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=log.parent,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the worker and reap it."""
        self.proc.kill()
        self.proc.wait()

    async def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the worker and wait for it to exit; return its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)  # a stopped process would not die of SIGKILL
            self.kill()


Spawn = Callable[[str, dict[str, str]], Worker]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """``spawn(app_target, env)`` starts a worker; all are killed after the test."""
    started: list[Worker] = []

    def start(target: str, env: dict[str, str]) -> Worker:
        worker = Worker(target, env, tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def tails(*workers: Worker, chars: int = 1500) -> str:
    """The end of each worker's output, for assertion messages."""
    return "\n".join(f"--- worker pid {w.pid}:\n{w.output()[-chars:]}" for w in workers)


# -- watching the database ---------------------------------------------------------------------


# What a restarting server answers: shutting down, not yet accepting connections.
LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.CannotConnectNowError,
)


class Db:
    """A plain connection to the test's schema, for watching sagas from outside the workers.
    Its application_name is not 'sagakit', so terminating sagakit's backends spares it; it
    reconnects after a PostgreSQL restart."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.schema = query.pop("schema")
        self.dsn = urlunsplit(parts._replace(query=""))
        self._conn: asyncpg.Connection | None = None

    async def fetch(self, statement: str, *args: Any, patience: float = 30.0) -> list[Any]:
        deadline = time.monotonic() + patience
        while True:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        self.dsn, server_settings={"search_path": self.schema}
                    )
                return list(await self._conn.fetch(statement, *args))
            except (OSError, asyncpg.InterfaceError, *LOST):
                await self.close()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def states(self) -> Counter[str]:
        rows = await self.fetch("SELECT state, count(*) FROM sagakit_sagas GROUP BY state")
        return Counter({r[0]: r[1] for r in rows})

    async def settled(self) -> int:
        states = await self.states()
        return sum(states[s] for s in SETTLED)

    async def owned_by(self, pid: int) -> set[str]:
        """Active sagas owned by the worker process ``pid`` (worker ids are host:pid:random)."""
        rows = await self.fetch(
            "SELECT id FROM sagakit_sagas WHERE state = ANY($1::text[])"
            " AND split_part(owner, ':', 2) = $2",
            ACTIVE,
            str(pid),
        )
        return {r[0] for r in rows}

    async def rows(self) -> dict[str, asyncpg.Record]:
        rows = await self.fetch(
            "SELECT id, state, owner, recoveries, takeovers, error FROM sagakit_sagas"
        )
        return {r["id"]: r for r in rows}


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Db]:
    watcher = Db(pg_url)
    yield watcher
    await watcher.close()


async def wait_for(
    what: str, done: Callable[[], Awaitable[bool]], timeout: float, *watched: Worker
) -> float:
    """Poll ``done`` until it holds; return the seconds it took. Fails after ``timeout`` or
    when a ``watched`` worker died."""
    began = time.monotonic()
    while not await done():
        for worker in watched:
            assert worker.alive(), f"a worker died waiting until {what}:\n{tails(worker)}"
        if time.monotonic() - began > timeout:
            raise AssertionError(f"not done after {timeout} s: {what}\n{tails(*watched)}")
        await asyncio.sleep(0.1)
    return time.monotonic() - began


async def settle(db: Db, total: int, timeout: float, *watched: Worker) -> float:
    """Wait until ``total`` sagas settled; on timeout, say which did not and who owns them."""

    async def done() -> bool:
        return await db.settled() >= total

    try:
        return await wait_for("every saga settled", done, timeout, *watched)
    except AssertionError as exc:
        stuck = await db.fetch(
            "SELECT id, state, owner, current_step FROM sagakit_sagas"
            " WHERE NOT (state = ANY($1::text[])) ORDER BY updated_at LIMIT 5",
            SETTLED,
        )
        alive = {w.pid: w.alive() for w in watched}
        lines = [
            f"{r['id']} {r['state']} at {r['current_step']}, owner {r['owner']}" for r in stuck
        ]
        raise AssertionError(
            f"{await db.states()} (workers alive: {alive}); not settled, e.g.:\n"
            + "\n".join(lines)
            + f"\n{exc}"
        ) from None


def pid_of(owner: str | None) -> int | None:
    return None if owner is None else int(owner.split(":")[1])


# -- the example and its ledger ----------------------------------------------------------------


def order_settings(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """``create_app`` settings for the example on a ledger in ``tmp_path`` (created)."""
    ledger = tmp_path / "ledger.db"
    Ledger(ledger).setup()
    return {**SIM, "ledger_path": ledger, "lease": 2.0, "poll_interval": 0.2, **overrides}


def expected_failures(orders: int) -> dict[str, int]:
    """Where each order must fail: its fate is drawn from its id, whatever happened."""
    sim = example.Simulation(decline_rate=SIM["decline_rate"],
                             shipment_failure_rate=SIM["shipment_failure_rate"])  # fmt: skip
    failed_at: Counter[str] = Counter()
    for n in range(1, orders + 1):
        declined, no_carrier, _ = sim.fate(example.sample_order(n).order_id)
        if declined or no_carrier:
            failed_at["process_payment" if declined else "create_shipment"] += 1
    return dict(failed_at)


async def audited(url: str, settings: dict[str, Any]) -> Audit:
    """Every saga checked against its journal and the ledger, read by a fresh client."""
    async with example.create_app(url, worker=False, **settings) as client:
        return await audit(client, Ledger(settings["ledger_path"]))


def assert_sound(found: Audit, orders: int, context: str = "", *, zombie_reruns: int = 0) -> None:
    """All orders ended completed or compensated, as their fate says; nothing applied twice,
    no committed step ran again (but for ``zombie_reruns``), every row matches its journal and
    no journal lost an entry."""
    states = Counter(found.states.values())
    assert sum(states.values()) == orders, (states, context)
    assert set(states) <= {SagaState.COMPLETED, SagaState.FAILED}, (states, context)
    assert found.ledger.applied_twice == [], context
    assert found.ledger.committed_reruns <= zombie_reruns, context
    assert found.ledger.unbalanced == [], context
    assert found.mismatches == [], context
    assert found.gaps == [], f"{context}\n{journal_of(found, found.gaps)}"
    assert found.failed_at == expected_failures(orders), f"{context}\n{unexpected(found)}"


def journal_of(found: Audit, ids: list[str]) -> str:
    """The first of ``ids``'s journal, one entry a line, for assertion messages."""
    if not ids:
        return ""
    lines = [f"journal of {ids[0]}:"]
    for e in found.journals[ids[0]]:
        error = f" {e.error.get('type')}: {e.error.get('message')}" if e.error else ""
        lines.append(f"  {e.index:3d} {e.kind.value} {e.step or ''} {e.attempt or ''}{error}")
    return "\n".join(lines)


def unexpected(found: Audit) -> str:
    """A failed saga that has no failed step: it failed for another reason than its fate."""
    odd = [
        saga_id
        for saga_id, state in found.states.items()
        if state is SagaState.FAILED
        and not any(e.kind is Kind.STEP_FAILED for e in found.journals[saga_id])
    ]
    return f"{len(odd)} sagas failed without a failed step\n{journal_of(found, odd)}"


# -- 1. three workers, one SIGKILLed -----------------------------------------------------------


@pytest.mark.timeout(180)
async def test_three_workers_run_1000_sagas_and_finish_a_killed_workers_sagas(
    pg_url: str, tmp_path: Path, spawn: Spawn, db: Db
) -> None:
    """Three workers share 1,000 orders; one is SIGKILLed a quarter of the way through. Its
    sagas are claimed by the other two (at once: its connections are gone) and finish;
    every order ends as its fate says, nothing is applied twice, no committed step re-runs."""
    orders = 1000
    settings = order_settings(tmp_path, latency=0.05, concurrency=40)
    async with example.create_app(pg_url, worker=False, **settings) as client:
        await enqueue(client, orders)
    env = example.environment(url=pg_url, **settings)
    began = time.monotonic()
    workers = [spawn(EXAMPLE, env) for _ in range(3)]
    victim, survivors = workers[0], workers[1:]

    async def victim_busy() -> bool:
        return await db.settled() >= orders // 4 and len(await db.owned_by(victim.pid)) >= 5

    await wait_for("a quarter settled, the victim holding sagas", victim_busy, 60, *workers)
    held = await db.owned_by(victim.pid)
    victim.kill()
    await settle(db, orders, 120, *survivors)
    took = time.monotonic() - began

    found = await audited(pg_url, settings)
    context = f"{took:.1f} s, victim held {len(held)}\n{tails(*workers)}"
    assert_sound(found, orders, context)
    rows = await db.rows()
    # The sagas the killed worker held were taken over (claimed from a dead owner) and
    # finished by the others, which ran their remaining steps.
    taken = {i for i in held if rows[i]["takeovers"] > 0}
    assert taken, context
    assert all(pid_of(rows[i]["owner"]) in {w.pid for w in survivors} for i in taken), context
    calls = Ledger(settings["ledger_path"]).calls()
    assert {c.saga_id for c in calls if c.saga_id in taken and c.pid != victim.pid}, context
    assert {c.pid for c in calls} == {w.pid for w in workers}, "every worker did some work"
    print(f"\n[pg-workers] 1000 sagas, 3 workers, 1 SIGKILL: {took:.1f} s; "
          f"{len(taken)} taken over, {found.ledger.reruns} step bodies re-run")  # fmt: skip


# -- 2. a paused worker (zombie) is fenced out -------------------------------------------------


def ledger_unlocked(path: Path) -> bool:
    """Whether a write transaction on the ledger can begin (no process holds its lock)."""
    conn = sqlite3.connect(path, timeout=0.5, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


async def pause_outside_ledger(worker: Worker, ledger: Path) -> None:
    """SIGSTOP ``worker`` at a moment it holds no lock on the ledger. The simulated services
    run inside the worker process, where a pause inside their transaction would stall every
    other worker's service calls; a real service runs elsewhere and is not paused with it."""
    for _ in range(50):
        worker.send(signal.SIGSTOP)
        if await asyncio.to_thread(ledger_unlocked, ledger):
            return
        worker.send(signal.SIGCONT)
        await asyncio.sleep(random.uniform(0.01, 0.1))
    raise AssertionError("the worker always held the ledger's lock")


@pytest.mark.timeout(150)
async def test_a_worker_paused_past_its_lease_is_fenced_out_when_it_wakes(
    pg_url: str, tmp_path: Path, spawn: Spawn, db: Db
) -> None:
    """A worker SIGSTOPped while it holds sagas keeps its connections, so only its lease
    expiring lets the other worker take them over; woken with SIGCONT, its writes are
    refused (FencedOut: it drops those sagas, and says so), and nothing happens twice."""
    orders, lease = 300, 2.0
    settings = order_settings(tmp_path, latency=0.4, concurrency=20, lease=lease)
    async with example.create_app(pg_url, worker=False, **settings) as client:
        await enqueue(client, orders)
    env = example.environment(url=pg_url, **settings)
    zombie, other = spawn(EXAMPLE, env), spawn(EXAMPLE, env)

    async def zombie_busy() -> bool:
        return await db.settled() >= 10 and len(await db.owned_by(zombie.pid)) >= 10

    await wait_for("the first worker holding sagas", zombie_busy, 60, zombie, other)
    await pause_outside_ledger(zombie, settings["ledger_path"])
    held = await db.owned_by(zombie.pid)

    async def taken_over() -> bool:
        return not await db.owned_by(zombie.pid)

    # The paused worker keeps its connections: only its lease can expire.
    took = await wait_for("the other worker took the paused one's sagas", taken_over, 30, other)
    assert took > lease / 2, f"taken over after {took:.2f} s, before the lease could expire"
    await asyncio.sleep(1.0)  # the new owner commits steps of the sagas it took over
    zombie.send(signal.SIGCONT)
    await settle(db, orders, 90, zombie, other)
    assert await zombie.stop() == 0
    assert await other.stop() == 0

    log = zombie.output()
    context = f"held {len(held)}, taken over after {took:.1f} s\n{tails(zombie, other)}"
    # Its writes were refused, and it said so: it dropped sagas it no longer owned.
    assert "dropping saga" in log, context
    assert "no longer owns saga" in log, context
    found = await audited(pg_url, settings)
    # A worker paused (SIGSTOP) after it decided to run a step body and before the body began
    # runs that body when it resumes, whatever check came before: at most one late body per
    # saga it held, after the new owner committed that step. Its journal writes are fenced out
    # and the service deduplicated the effect (applied_twice stays empty).
    assert_sound(found, orders, context, zombie_reruns=len(held))
    calls = Ledger(settings["ledger_path"]).calls()
    assert {c.saga_id for c in calls if c.saga_id in held and c.pid == other.pid}, context
    dropped = set(re.findall(r"dropping saga (\S+):", log))
    print(f"\n[pg-workers] zombie: held {len(held)}, taken over after {took:.1f} s, "
          f"dropped {len(dropped)} sagas on waking")  # fmt: skip


# -- 3. connections terminated at step boundaries ----------------------------------------------


def pg_client_ports(pids: list[int]) -> list[int]:
    """Local ports of the TCP connections to port 5432 that the processes ``pids`` hold, so
    that the test terminates its own workers' backends only (other tests may share the
    server)."""
    inodes: set[str] = set()
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir() if fds.exists() else ():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == 5432:
                ports.append(int(local.rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.timeout(120)
async def test_sagas_end_while_connections_are_terminated_again_and_again(
    pg_url: str, tmp_path: Path, spawn: Spawn, db: Db
) -> None:
    """``pg_terminate_backend`` on the workers' pool connections every few hundred ms while
    600 orders run: every saga still ends as its fate says, its journal complete, nothing
    applied twice, and lost connections surface as StoreUnavailable only."""
    orders = 600
    settings = order_settings(tmp_path, latency=0.1, concurrency=30)
    async with example.create_app(pg_url, worker=False, **settings) as client:
        await enqueue(client, orders)
    env = example.environment(url=pg_url, **settings)
    workers = [spawn(EXAMPLE, env) for _ in range(2)]
    began = time.monotonic()
    terminated, mid_statement, rounds = 0, 0, 0
    # Every few hundred milliseconds, whatever the workers are doing (most of the time they
    # are between steps, writing an outcome and the next start), their pool connections go.
    while await db.settled() < orders and time.monotonic() - began < 20:
        await asyncio.sleep(random.uniform(0.2, 0.5))
        ports = pg_client_ports([w.pid for w in workers])
        killed = await db.fetch(
            "SELECT state, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'sagakit' AND pid <> pg_backend_pid()"
            " AND client_port = ANY($1::int[])",
            ports,
        )
        rounds += 1
        terminated += len(killed)
        mid_statement += sum(1 for r in killed if r["state"] == "active")
        for w in workers:
            assert w.alive(), tails(w)
    await settle(db, orders, 30, *workers)
    took = time.monotonic() - began

    context = f"{rounds} rounds, {terminated} terminated ({mid_statement} mid-statement)"
    found = await audited(pg_url, settings)
    assert_sound(found, orders, f"{context}\n{tails(*workers)}")
    assert rounds >= 5, context
    assert terminated >= rounds, context
    logs = "".join(w.output() for w in workers)
    assert "cannot be reached" in logs, f"no worker noticed a terminated connection; {context}"
    # Lost connections are StoreUnavailable, never a raw driver error.
    escaped = [line for line in logs.splitlines() if "asyncpg.exceptions" in line]
    assert escaped == [], escaped[:3]
    print(f"\n[pg-workers] terminate: {context}; all {orders} ended in {took:.1f} s")


# -- 4. PostgreSQL restarted during recovery ---------------------------------------------------


def pg_restart_command() -> list[str]:
    """The command that restarts the local cluster, or skip if this machine has none."""
    etc = Path("/etc/postgresql")
    clusters = sorted(etc.glob("*/main")) if etc.is_dir() else []
    if shutil.which("pg_ctlcluster") is None or not clusters or os.geteuid() != 0:
        pytest.skip("restarting PostgreSQL needs root and pg_ctlcluster (Debian's packaging)")
    version = clusters[-1].parent.name
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"]


@pytest.mark.timeout(180)
async def test_sagas_end_when_postgresql_restarts_during_recovery(
    pg_url: str, tmp_path: Path, spawn: Spawn, db: Db
) -> None:
    """A worker holding many sagas is SIGKILLed; PostgreSQL restarts while a fresh worker is
    recovering them. The fresh worker reconnects and every saga ends: none is stranded."""
    restart = pg_restart_command()
    orders = 300
    settings = order_settings(tmp_path, latency=0.3, concurrency=60)
    async with example.create_app(pg_url, worker=False, **settings) as client:
        await enqueue(client, orders)
    env = example.environment(url=pg_url, **settings)
    first = spawn(EXAMPLE, env)

    async def many_in_flight() -> bool:
        return await db.settled() >= 10 and len(await db.owned_by(first.pid)) >= 40

    await wait_for("the first worker holding many sagas", many_in_flight, 60, first)
    held = await db.owned_by(first.pid)
    first.kill()
    fresh = spawn(EXAMPLE, env)

    async def recovering() -> bool:
        return len(await db.owned_by(fresh.pid) & held) > 0

    await wait_for("the fresh worker recovering the killed one's sagas", recovering, 30, fresh)
    began = time.monotonic()
    done = await asyncio.to_thread(
        subprocess.run, restart, capture_output=True, text=True, timeout=60, check=False
    )
    restarted = time.monotonic() - began
    assert done.returncode == 0, done.stdout + done.stderr
    await settle(db, orders, 120, fresh)
    took = time.monotonic() - began

    context = f"held {len(held)}, restart took {restarted:.1f} s\n{tails(fresh)}"
    found = await audited(pg_url, settings)
    assert_sound(found, orders, context)
    assert "store error" in fresh.output() or "reconnecting" in fresh.output(), context
    print(f"\n[pg-workers] restart during recovery of {len(held)} sagas: restart "
          f"{restarted:.1f} s, all {orders} ended {took:.1f} s after it began")  # fmt: skip


# -- 5. idempotent start racing from two processes ---------------------------------------------

RACE = """
import asyncio, json, sys, time
import pg_worker_apps as apps

async def main(url, go, reverse):
    keys = [f"order-{i:02d}" for i in range(50)]
    if reverse:
        keys.reverse()
    async with apps.build(url, worker=False) as app:
        await asyncio.sleep(max(0.0, go - time.time()))
        handles = await asyncio.gather(
            *(app.start(apps.TRIVIAL, {"key": k}, idempotency_key=k) for k in keys)
        )
    print(json.dumps({k: [h.id, h.created] for k, h in zip(keys, handles)}))

asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3] == "reverse"))
"""


@pytest.mark.timeout(60)
async def test_two_processes_starting_the_same_50_keys_make_50_sagas(pg_url: str, db: Db) -> None:
    """Two processes start the same 50 idempotency keys at the same instant (on a fresh
    schema, so they also race to migrate it): 50 sagas, each created by exactly one of
    them, and both get the same saga for each key."""
    go = time.time() + 3.0  # both processes are connected by then, and start together
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}

    def run(order: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", RACE, pg_url, str(go), order],
            env=env,
            capture_output=True,
            text=True,
            timeout=45,
            check=False,
        )

    # One starts the keys in the order the other ends: their inserts cross.
    first, second = await asyncio.gather(
        asyncio.to_thread(run, "forward"), asyncio.to_thread(run, "reverse")
    )
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert len(one) == len(two) == 50
    assert {k: v[0] for k, v in one.items()} == {k: v[0] for k, v in two.items()}
    created = sum(v[1] for v in one.values()) + sum(v[1] for v in two.values())
    assert created == 50, "each key created its saga in exactly one process"
    rows = await db.fetch("SELECT idempotency_key FROM sagakit_sagas")
    assert sorted(r[0] for r in rows) == sorted(one)


# -- 6. a poison saga is parked ----------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_a_saga_that_kills_its_worker_is_parked_after_max_recoveries(
    pg_url: str, spawn: Spawn, db: Db
) -> None:
    """A saga whose step SIGKILLs its worker, every time, among 60 ordinary sagas on two
    workers (each one killed is replaced): it kills max_recoveries + 1 workers, then is
    parked in needs_attention with a message that says why; the others complete."""
    max_recoveries, bystanders = 2, 60
    env = apps.environment(pg_url, lease=2.0, max_recoveries=max_recoveries,
                           max_concurrency=100, poll_interval=0.2)  # fmt: skip
    workers = [spawn(APPS, env) for _ in range(2)]
    async with apps.build(pg_url, worker=False) as client:
        slow = [(await client.start(apps.SLOW, {"pause": 0.3})).id for _ in range(bystanders // 2)]
        poison = (await client.start(apps.POISON, {"n": 0})).id
        await asyncio.sleep(0.3)
        slow += [(await client.start(apps.SLOW, {"pause": 0.3})).id for _ in range(bystanders // 2)]

    deaths: list[int] = []
    began = time.monotonic()
    # Keep two workers running: replace each one the poison kills.
    while await db.settled() < bystanders + 1:
        for i, worker in enumerate(workers):
            if not worker.alive():
                deaths.append(worker.proc.returncode)
                workers[i] = spawn(APPS, env)
        assert len(deaths) <= max_recoveries + 3, f"the poison saga keeps killing: {deaths}"
        assert time.monotonic() - began < 90, f"not settled: {await db.states()}"
        await asyncio.sleep(0.1)
    took = time.monotonic() - began
    for worker in workers:
        if worker.alive():
            assert await worker.stop() == 0

    rows = await db.rows()
    states = Counter(rows[i]["state"] for i in slow)
    context = f"{took:.1f} s, deaths {deaths}, bystanders {dict(states)}"
    assert rows[poison]["state"] == "needs_attention", context
    message = json.loads(rows[poison]["error"])["message"]
    assert f"died {max_recoveries + 1} times" in message, message
    assert "may be what kills them" in message, message
    assert deaths == [-signal.SIGKILL] * (max_recoveries + 1), context
    # The other sagas finished, however often they shared a worker with the poison.
    parked = [(i, rows[i]["recoveries"]) for i in slow if rows[i]["state"] != "completed"]
    assert states == {"completed": bystanders}, f"{context}; not completed: {parked[:5]}"


# -- 7. graceful shutdown hands sagas over at once ---------------------------------------------


@pytest.mark.timeout(120)
async def test_a_worker_stopped_with_sigterm_hands_its_sagas_over_at_once(
    pg_url: str, tmp_path: Path, spawn: Spawn, db: Db
) -> None:
    """SIGTERM a worker mid-run with a 30 s lease: it releases its sagas and exits 0, the
    other worker owns them within a fraction of the lease, and all finish soundly."""
    orders, lease = 200, 30.0
    settings = order_settings(tmp_path, latency=0.3, concurrency=20, lease=lease)
    async with example.create_app(pg_url, worker=False, **settings) as client:
        await enqueue(client, orders)
    env = example.environment(url=pg_url, **settings)
    leaving, staying = spawn(EXAMPLE, env), spawn(EXAMPLE, env)

    async def leaving_busy() -> bool:
        return await db.settled() >= 10 and len(await db.owned_by(leaving.pid)) >= 10

    await wait_for("the leaving worker holding sagas", leaving_busy, 60, leaving, staying)
    held = await db.owned_by(leaving.pid)
    leaving.send(signal.SIGTERM)

    async def handed_over() -> bool:
        rows = await db.rows()
        return all(
            rows[i]["state"] in SETTLED or pid_of(rows[i]["owner"]) == staying.pid for i in held
        )

    took = await wait_for("the staying worker took the sagas over", handed_over, lease, staying)
    code = await asyncio.to_thread(leaving.proc.wait, 20)
    await settle(db, orders, 60, staying)
    assert await staying.stop() == 0

    context = f"held {len(held)}, handed over after {took:.2f} s\n{tails(leaving, staying)}"
    assert code == 0, context
    assert "sagakit worker stopped" in leaving.output(), context
    assert took < lease / 6, context  # at once, not when the lease runs out
    found = await audited(pg_url, settings)
    assert_sound(found, orders, context)
    print(f"\n[pg-workers] SIGTERM: {len(held)} sagas handed over in {took:.2f} s "
          f"(lease {lease:.0f} s)")  # fmt: skip


# -- 8. recovery at scale ----------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_10000_sagas_of_a_dead_worker_are_recovered_by_two_workers_with_small_pools(
    pg_url: str, spawn: Spawn, db: Db
) -> None:
    """10,000 sagas, most of them held by a worker that is then SIGKILLed, are recovered by
    two workers with 4 connections each: all complete, with no warning or error logged
    (no pool exhaustion, no timeouts). Prints how long recovery took."""
    total, chunk = 10_000, 2_000
    began = time.monotonic()
    async with apps.build(pg_url, worker=False) as client:
        for start in range(0, total, chunk):
            await asyncio.gather(
                *(client.start(apps.TRIVIAL, {"n": n}) for n in range(start, start + chunk))
            )
    enqueued = time.monotonic() - began
    # One worker claims nearly all of them (its steps hang), and dies: they are left pending
    # on a dead owner.
    env = apps.environment(pg_url, lease=5.0, max_concurrency=total)
    greedy = spawn(APPS, {**env, apps.STALL: "600"})

    async def holds_most() -> bool:
        return len(await db.owned_by(greedy.pid)) >= total * 3 // 4

    await wait_for("one worker holding most sagas", holds_most, 60, greedy)
    greedy.kill()
    # A claim the worker sent just before it died still commits on the server: count what it
    # holds once that count stops moving.
    held, before = len(await db.owned_by(greedy.pid)), -1
    while held != before:
        await asyncio.sleep(0.5)
        before, held = held, len(await db.owned_by(greedy.pid))
    env = apps.environment(pg_url, lease=5.0, pool_size=4, max_concurrency=500)
    workers = [spawn(APPS, env) for _ in range(2)]
    recovered = await settle(db, total, 200, *workers)
    for worker in workers:
        assert await worker.stop() == 0

    states = await db.states()
    assert states == {"completed": total}, states
    rows = await db.rows()
    taken = sum(1 for r in rows.values() if r["takeovers"] == 1)
    assert taken == held, f"{held} held by the dead worker, {taken} taken over"
    for worker in workers:
        problems = [
            line
            for line in worker.output().splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line
        ]
        assert problems == [], problems[:10]
    print(f"\n[pg-workers] {total} sagas enqueued in {enqueued:.1f} s; {held} held by a killed "
          f"worker, all recovered by 2 workers (pool_size 4) in {recovered:.1f} s "
          f"({total / recovered:.0f}/s, worker start-up included)")  # fmt: skip
