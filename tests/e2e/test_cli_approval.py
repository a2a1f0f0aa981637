"""The approval example driven from the command line: a worker process runs the saga, and
``sagakit signal`` / ``sagakit cancel`` from other processes decide it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sagakit import App, SagaState
from sagakit.examples.approval import SAGA_TYPE, Budget, create_app, sample_request


def run_cli(*args: str, cwd: Path, url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    return subprocess.run(
        [sys.executable, "-m", "sagakit", *args, "--db", url],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    url = f"sqlite:///{tmp_path / 'approvals.db'}"
    budget = tmp_path / "budget.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    env |= {"SAGAKIT_APPROVAL_DB": url, "SAGAKIT_APPROVAL_BUDGET": str(budget)}
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sagakit", "worker", "--app", "sagakit.examples.approval:app"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield url, budget
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


async def start(url: str, budget: Path, n: int) -> str:
    app = create_app(url, budget_path=budget, worker=False)
    async with app:
        handle = await app.start(SAGA_TYPE, sample_request(n))
        async with asyncio.timeout(20):
            while not (await app.get(handle.id)).waiting:
                await asyncio.sleep(0.05)
        return handle.id


async def final(url: str, saga_id: str) -> SagaState:
    async with App(url, worker=False) as app, asyncio.timeout(20):
        while (info := await app.get(saga_id)).state not in (
            SagaState.COMPLETED,
            SagaState.FAILED,
            SagaState.CANCELLED,
        ):
            await asyncio.sleep(0.05)
        return info.state


async def test_approve_and_reject_from_the_cli(worker: tuple[str, Path], tmp_path: Path) -> None:
    url, budget_path = worker
    budget = Budget(budget_path)
    approved = await start(url, budget_path, 1)
    rejected = await start(url, budget_path, 2)
    assert budget.held("PR-0001") > 0
    shown = run_cli("show", approved, cwd=tmp_path, url=url)
    assert "unloaded until" in shown.stdout
    listed = run_cli("list", cwd=tmp_path, url=url)
    assert "(waiting)" in listed.stdout

    done = run_cli("signal", approved, "approve", '{"by": "ann"}', cwd=tmp_path, url=url)
    assert done.returncode == 0, done.stderr
    assert "sent to saga" in done.stdout
    # A repeated signal id is stored once (a signal the saga does not wait for, so that the
    # saga is still waiting for the repeat: a finished saga refuses every signal).
    for _ in range(2):
        memo = run_cli("signal", rejected, "memo", '"call me"', "--id", "m1", cwd=tmp_path,
                       url=url)  # fmt: skip
        assert memo.returncode == 0, memo.stderr
    assert "was already sent to" in memo.stdout
    no = run_cli("signal", rejected, "reject", '{"by": "bob"}', cwd=tmp_path, url=url)
    assert no.returncode == 0, no.stderr

    assert await final(url, approved) is SagaState.COMPLETED
    assert await final(url, rejected) is SagaState.FAILED
    assert len(budget.orders("PR-0001")) == 1
    assert budget.held("PR-0002") == 0

    late = run_cli("signal", approved, "approve", "{}", cwd=tmp_path, url=url)
    assert late.returncode == 4  # refused by the saga's state
    assert "completed" in late.stderr


async def test_cancel_from_the_cli_releases_the_budget(
    worker: tuple[str, Path], tmp_path: Path
) -> None:
    url, budget_path = worker
    saga_id = await start(url, budget_path, 3)
    done = run_cli("cancel", saga_id, "--reason", "not needed", cwd=tmp_path, url=url)
    assert done.returncode == 0, done.stderr
    assert await final(url, saga_id) is SagaState.CANCELLED
    assert Budget(budget_path).held("PR-0003") == 0
    shown = run_cli("show", saga_id, cwd=tmp_path, url=url)
    assert "cancel requested" in shown.stdout
    assert "not needed" in shown.stdout


def test_bad_signal_payload_is_refused_and_sends_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert run_cli("migrate", cwd=tmp_path, url=url).returncode == 0
    bad = run_cli("signal", "some-id", "approve", "{not json", cwd=tmp_path, url=url)
    assert bad.returncode == 2  # bad input
    assert "PAYLOAD must be JSON" in bad.stderr
    unknown = run_cli("signal", "some-id", "approve", "{}", cwd=tmp_path, url=url)
    assert unknown.returncode == 3  # no such saga
    assert "no saga with id" in unknown.stderr


async def _parked(url: str) -> str:
    """A saga whose compensation keeps failing: it ends in needs_attention."""
    from sagakit import RetryPolicy, Saga, step

    async def reserve(ctx: object, data: object) -> str:
        return "r"

    async def release(ctx: object, data: object, result: object) -> None:
        raise ConnectionError("inventory service down")

    async def charge(ctx: object, data: object) -> None:
        raise RuntimeError("declined")

    app = App(url, poll_interval=0.05)
    once = RetryPolicy(max_attempts=1)
    steps = [step("reserve", reserve, compensate=release, compensate_retry=once),
             step("charge", charge)]  # fmt: skip
    app.register(Saga("Stuck", steps=steps))
    async with app:
        handle = await app.start("Stuck", None)
        info = await app.wait(handle.id)
        assert info.state is SagaState.NEEDS_ATTENTION
        return handle.id


async def test_retry_and_resolve_from_the_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ops.db'}"
    saga_id = await _parked(url)
    retried = run_cli("retry", saga_id, cwd=tmp_path, url=url)
    assert retried.returncode == 0, retried.stderr
    async with App(url, worker=False) as app:
        assert (await app.get(saga_id)).state is SagaState.COMPENSATING
    again = run_cli("retry", saga_id, cwd=tmp_path, url=url)
    assert again.returncode == 4  # refused: no longer needs attention
    assert "needs_attention" in again.stderr
    no_note = run_cli("resolve", saga_id, cwd=tmp_path, url=url)
    assert no_note.returncode == 2  # click: the required --note is missing
    other = await _parked(url)
    done = run_cli("resolve", other, "--note", "released by hand", cwd=tmp_path, url=url)
    assert done.returncode == 0, done.stderr
    async with App(url, worker=False) as app:
        assert (await app.get(other)).state is SagaState.FAILED
