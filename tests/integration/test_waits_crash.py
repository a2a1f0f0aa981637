"""Crash tests of long-running sagas: a worker process that runs sagas waiting for approval
signals, or a step under a timeout, is SIGKILLed and restarted, on SQLite and on PostgreSQL.

Workers are ``python -m sagakit worker --app wait_crash_apps:app`` subprocesses (see
wait_crash_apps.py: the approval example with an approval window of seconds); the test's own
``App(worker=False)`` starts sagas, sends signals while workers live and while none does,
and audits journals, rows and the example's budget service afterwards.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wait_crash_apps as apps

from sagakit import App, Kind, SagaState
from sagakit.examples.approval import SAGA_TYPE, budget_of, sample_request

pytestmark = pytest.mark.crash

Check = Callable[[App, str], Awaitable[Any]]
HERE = Path(__file__).resolve().parent
TARGET = "wait_crash_apps:app"
SETTLED = {SagaState.COMPLETED, SagaState.FAILED, SagaState.CANCELLED, SagaState.NEEDS_ATTENTION}


# -- worker processes --------------------------------------------------------------------------


class Worker:
    """A ``python -m sagakit worker`` subprocess; its output goes to a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("SAGAKIT_", "WCA_"))}
        path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sagakit", "worker", "--app", TARGET],
                env={**inherited, "PYTHONPATH": path, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=log.parent,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

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


Spawn = Callable[[dict[str, str]], Worker]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """``spawn(env)`` starts a worker; any still alive are killed after the test."""
    started: list[Worker] = []

    def start(env: dict[str, str]) -> Worker:
        worker = Worker(env, tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.alive():
            worker.kill()


def logs(workers: list[Worker], chars: int = 1500) -> str:
    return "\n".join(f"--- worker {i}:\n{w.output()[-chars:]}" for i, w in enumerate(workers))


def settings(tmp_path: Path, approval_seconds: float = 60.0) -> dict[str, Any]:
    return {
        "budget": tmp_path / "budget.db",
        "runs": tmp_path / "runs.txt",
        "approval_seconds": approval_seconds,
        "poll_interval": 0.1,
        "lease": 2.0,
    }


async def settle(app: App, ids: list[str], timeout: float, workers: list[Worker]) -> float:
    """Wait until every saga in ``ids`` settled; on timeout, say which did not."""
    began = time.monotonic()
    while True:
        infos = [await app.get(i) for i in ids]
        stuck = [i for i in infos if i.state not in SETTLED]
        if not stuck:
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            lines = [f"{i.id} {i.state} at {i.current_step}, waiting={i.waiting}" for i in stuck]
            raise AssertionError(
                f"{len(stuck)} sagas not settled after {timeout} s, e.g.:\n"
                + "\n".join(lines[:5])
                + f"\n{logs(workers)}"
            )
        await asyncio.sleep(0.1)


# -- approvals under SIGKILL -------------------------------------------------------------------

REQUESTS = 60
BATCHES = 4  # one kill in each: 4 kills
# Longer than the whole signalling phase (about 2 s): every signal is sent well before the
# wait it answers can time out, so each saga's outcome is known in advance.
APPROVAL_SECONDS = 5.0


def fate(n: int) -> str | None:
    """What request ``n`` gets: an approval, a rejection, or no answer (it times out)."""
    return ("approve", "reject", None)[n % 3]


@pytest.mark.timeout(60)
async def test_approvals_survive_sigkills_and_no_signal_is_lost(
    any_url: str, tmp_path: Path, spawn: Spawn, check: Check
) -> None:
    """60 purchase requests; 40 get an approve or reject signal, in four batches, each batch
    sent half while a worker runs and half while none does (it was just SIGKILLed at a random
    moment; it is restarted after). Every saga ends as its signal says (completed when
    approved, failed when rejected or unanswered), its journal is consistent and waited and
    received once, and the budget service shows one order and a held budget for each
    approved request and nothing held for the others."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    config = settings(tmp_path, APPROVAL_SECONDS)
    env = apps.environment(any_url, **config)
    async with apps.build(any_url, worker=False, **config) as client:
        # Set the budget file up before the worker's threads first use it all at once: that
        # race fails requests on its own (see test_approval_budget.py), crash or no crash.
        assert budget_of(client).held("PR-none") == 0
        workers = [spawn(env)]
        began = time.monotonic()
        handles = await asyncio.gather(
            *(
                client.start(SAGA_TYPE, sample_request(n), idempotency_key=f"PR-{n:04d}")
                for n in range(REQUESTS)
            )
        )
        ids = [h.id for h in handles]
        answered = [n for n in range(REQUESTS) if fate(n) is not None]
        rng.shuffle(answered)
        per_batch = -(-len(answered) // BATCHES)
        sent: dict[int, tuple[str, str, bool]] = {}  # n -> (name, signal_id, sent while dead)

        async def send(ns: list[int], dead: bool) -> None:
            for n in ns:
                name = fate(n)
                assert name is not None
                signal_id = f"{name}-{n}"
                payload = {"by": "ann" if name == "approve" else "bob", "comment": f"#{n}"}
                assert await client.signal(ids[n], name, payload, signal_id=signal_id)
                sent[n] = (name, signal_id, dead)

        for b in range(BATCHES):
            batch = answered[b * per_batch : (b + 1) * per_batch]
            half = len(batch) // 2
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            await send(batch[:half], dead=False)
            await asyncio.sleep(rng.uniform(0.0, 0.2))
            assert workers[-1].alive(), logs(workers)
            workers[-1].kill()
            await send(batch[half:], dead=True)
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            workers.append(spawn(env))
        signalled = time.monotonic() - began

        took = await settle(client, ids, 30, workers)
        context = f"seed {seed}, signals sent in {signalled:.1f} s, settled {took:.1f} s later"
        budget = budget_of(client)
        outcomes: Counter[str] = Counter()
        reruns = 0  # step bodies started again after a kill (their outcome was not journaled)
        for n, saga_id in enumerate(ids):
            c = await check(client, saga_id)  # the row is the journal's projection
            req = sample_request(n)
            state, error = c.info.state, c.info.error or {}
            where = f"request {n} ({fate(n)}, {sent.get(n)}), saga {saga_id}: {context}"
            waiting = c.of(Kind.SIGNAL_WAITING)
            received = c.of(Kind.SIGNAL_RECEIVED)
            timed_out = c.of(Kind.SIGNAL_TIMED_OUT)
            # The wait was journaled once: a resumed wait keeps its original timeout.
            assert len(waiting) == 1, (c.kinds(), where)
            until = float((waiting[0].data or {})["until"])
            assert until - waiting[0].at == pytest.approx(APPROVAL_SECONDS, abs=0.5), where
            if fate(n) is None:
                assert state is SagaState.FAILED, (state, error, where)
                assert error.get("type") == "ApprovalExpired", (error, where)
                assert received == [], where
                assert len(timed_out) == 1, where
                assert timed_out[0].at >= until, where
            else:
                name, signal_id, _ = sent[n]
                # The premise of a known outcome: the answer was stored before the wait could
                # time out (see test_waits_backends.py for an answer that comes later).
                (stored,) = await client.store.signals(saga_id)
                assert stored.at < until - 1.0, (stored.at - until, where)
                assert timed_out == [], (c.kinds(), where)
                assert [(e.data or {}).get("signal_id") for e in received] == [signal_id], where
                assert (received[0].data or {}).get("name") == name, where
                if name == "approve":
                    assert state is SagaState.COMPLETED, (state, error, where)
                    assert c.info.output["approved_by"] == "ann", where
                else:
                    assert state is SagaState.FAILED, (state, error, where)
                    assert error.get("type") == "Rejected", (error, where)
            orders = budget.orders(req.request_id)
            if state is SagaState.COMPLETED:
                assert len(orders) == 1, (orders, where)
                assert c.info.output["purchase_order"] == orders[0], where
                assert budget.held(req.request_id) == req.amount, where
            else:
                assert orders == [], (orders, where)
                assert budget.held(req.request_id) == 0, where
                assert [e.step for e in c.of(Kind.COMPENSATION_COMPLETED)] == ["reserve_budget"], (
                    where
                )
            outcomes[f"{fate(n)}:{state}"] += 1
            reruns += c.projection.reruns

        assert outcomes == {"approve:completed": 20, "reject:failed": 20, "None:failed": 20}
        assert sum(1 for _, _, dead in sent.values() if dead) >= 16, context
        assert len(workers) == BATCHES + 1
        assert await workers[-1].stop() == 0, logs(workers)
    output = "".join(w.output() for w in workers)
    assert "Traceback" not in output, logs(workers)
    backend = "postgres" if any_url.startswith("postgres") else "sqlite"
    print(f"\n[waits-crash] {backend}: {BATCHES} kills, {reruns} step re-runs, {context}")


# -- a step timeout under SIGKILL --------------------------------------------------------------

# Seconds between the SIGKILL (0.5 s into the step) and the restart: after the 1 s step's
# deadline, and at once, well before the 3 s step's deadline.
RESTART_AFTER = {apps.HANG: 1.0, apps.HANG_LONGER: 0.0}


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "saga_type",
    [apps.HANG, apps.HANG_LONGER],
    ids=["restart-after-the-deadline", "restart-before-the-deadline"],
)
async def test_a_step_timeout_holds_across_a_sigkill(
    any_url: str, tmp_path: Path, spawn: Spawn, check: Check, saga_type: str
) -> None:
    """A step that sleeps 30 s under a timeout; its worker is SIGKILLed 0.5 s into it and
    restarted ``restart_after`` s later. The step times out at its ORIGINAL deadline: the
    re-run attempt carries the first one's ``ends``; restarted after that deadline, the body
    does not run again; restarted before it, the body runs again only until that deadline,
    not for a fresh timeout. The saga compensates and ends failed."""
    timeout = apps.TIMEOUTS[saga_type]
    restart_after = RESTART_AFTER[saga_type]
    config = settings(tmp_path)
    runs = apps.Runs(config["runs"])
    env = apps.environment(any_url, **config)
    workers = [spawn(env)]
    async with apps.build(any_url, worker=False, **config) as client:
        handle = await client.start(saga_type, None)

        async def first_start() -> Any:
            async with asyncio.timeout(10):
                while True:
                    starts = [e for e in await client.journal(handle.id)
                              if e.kind is Kind.STEP_STARTED and e.step == "hang"]  # fmt: skip
                    if starts and any(line.startswith("hang ") for line in runs.lines()):
                        return starts[0]
                    await asyncio.sleep(0.01)

        first = await first_start()
        ends = float((first.data or {})["ends"])
        assert ends - first.at == pytest.approx(timeout, abs=0.1)
        await asyncio.sleep(max(0.0, first.at + 0.5 - time.time()))
        workers[-1].kill()
        killed = time.time()
        await asyncio.sleep(restart_after)
        workers.append(spawn(env))
        await settle(client, [handle.id], 15, workers)

        c = await check(client, handle.id)
        context = f"killed {killed - first.at:.2f} s into the step, deadline {ends - killed:+.2f} s"
        assert c.info.state is SagaState.FAILED, (c.info.state, c.info.error, context)
        assert c.info.error is not None
        assert "timed out" in c.info.error["message"], (c.info.error, context)
        assert f"after {timeout} s" in c.info.error["message"], c.info.error
        starts = [e for e in c.of(Kind.STEP_STARTED) if e.step == "hang"]
        assert len(starts) == 2, (c.kinds(), context)
        assert [e.attempt for e in starts] == [1, 1]
        assert [(e.data or {})["ends"] for e in starts] == [ends, ends], context
        (failed,) = [e for e in c.of(Kind.STEP_FAILED) if e.step == "hang"]
        assert failed.at >= ends, (failed.at - ends, context)
        bodies = [line for line in runs.lines() if line.startswith("hang ")]
        if restart_after >= timeout:
            # back after the deadline: timed out at once, the body not run again
            assert starts[1].at > ends, context
            assert len(bodies) == 1, (bodies, context)
        else:
            # back before the deadline: the body ran again, for what was left of its time
            assert starts[1].at < ends, (starts[1].at - ends, context)
            assert len(bodies) == 2, (bodies, context)
            assert failed.at < ends + 0.5, (failed.at - ends, context)
        assert [e.step for e in c.of(Kind.COMPENSATION_COMPLETED)] == ["reserve"], context
        assert runs.lines().count(f"release {handle.id}") == 1
        assert await workers[-1].stop() == 0, logs(workers)
    backend = "postgres" if any_url.startswith("postgres") else "sqlite"
    print(f"\n[waits-crash] {backend} {saga_type}: resumed {starts[1].at - first.at:.2f} s into "
          f"the {timeout} s step, failed {failed.at - ends:+.3f} s from its deadline")  # fmt: skip
