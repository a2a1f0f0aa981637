"""The ``sagakit`` command run as a subprocess (``python -m sagakit``), in a temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sagakit import Entry, Kind
from sagakit.cli import timeline
from sagakit.store.sqlite import migrations

ORDERS = 30


def sagakit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    return subprocess.run(
        [sys.executable, "-m", "sagakit", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A directory where ``sagakit demo --orders 30`` ran, and how it went."""
    cwd = tmp_path_factory.mktemp("demo")
    return cwd, sagakit("demo", "--orders", str(ORDERS), cwd=cwd)


@pytest.fixture
def cwd(demo: tuple[Path, subprocess.CompletedProcess[str]]) -> Path:
    return demo[0]


def listed(cwd: Path, *args: str) -> list[dict[str, Any]]:
    result = sagakit("list", "--json", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def test_demo_runs_kills_and_prints_the_summary(
    demo: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    cwd, result = demo
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in ("completed", "compensated (failed)", "needs_attention", "effects applied twice",
                 "committed steps re-run", "step bodies re-run after recovery"):  # fmt: skip
        assert line in out, out
    assert "SIGKILL worker" in out
    assert "try: sagakit list" in out
    assert (cwd / "sagakit.db").exists()
    assert (cwd / "sagakit-ledger.db").exists()


def test_demo_starts_afresh_each_time(tmp_path: Path) -> None:
    for _ in range(2):
        result = sagakit("demo", "--orders", "5", "--kills", "0", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    assert len(listed(tmp_path)) == 5


def test_demo_refuses_a_database_it_did_not_make(tmp_path: Path) -> None:
    assert sagakit("migrate", cwd=tmp_path).returncode == 0
    # An empty database is fine to replace; one with somebody's sagas is not.
    assert sagakit("demo", "--orders", "2", "--kills", "0", cwd=tmp_path).returncode == 0
    (tmp_path / "sagakit-ledger.db").unlink()
    result = sagakit("demo", "--orders", "2", cwd=tmp_path)
    assert result.returncode == 1
    assert "did not create" in result.stderr
    assert len(listed(tmp_path)) == 2


def test_list_shows_the_sagas(cwd: Path) -> None:
    rows = listed(cwd)
    assert len(rows) == ORDERS
    assert {r["state"] for r in rows} == {"completed", "failed"}
    assert {r["idempotency_key"] for r in rows} == {f"order-{n:04d}" for n in range(1, 31)}
    table = sagakit("list", cwd=cwd)
    assert table.returncode == 0, table.stderr
    for row in rows:
        assert row["id"] in table.stdout
    assert "OrderFulfillment" in table.stdout


def test_list_filters(cwd: Path) -> None:
    failed = listed(cwd, "--state", "failed")
    assert failed
    assert all(r["state"] == "failed" for r in failed)
    assert len(listed(cwd, "--limit", "3")) == 3
    assert listed(cwd, "--type", "NoSuchType") == []
    assert len(listed(cwd, "--type", "OrderFulfillment")) == ORDERS
    bad = sagakit("list", "--state", "sleeping", cwd=cwd)
    assert bad.returncode == 2
    assert "sleeping" in bad.stderr


def test_show_prints_the_timeline_with_compensations(cwd: Path) -> None:
    saga = next(r for r in listed(cwd, "--state", "failed"))
    result = sagakit("show", saga["id"], cwd=cwd)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert saga["id"] in out
    assert "create_shipment" in out
    assert "ShipmentFailed" in out
    assert "↩ process_payment" in out
    assert "↩ reserve_inventory" in out
    assert "compensated" in out
    assert " ms" in out  # durations


def test_show_json(cwd: Path) -> None:
    saga = next(r for r in listed(cwd, "--state", "failed"))
    result = sagakit("show", saga["id"], "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["saga"]["id"] == saga["id"]
    assert shown["saga"]["input"]["order_id"] == saga["idempotency_key"]
    # A compensation the demo's SIGKILL interrupted shows as such, then runs again.
    rows = [(r["what"], r["outcome"]) for r in shown["timeline"] if r["outcome"] != "interrupted"]
    assert ("create_shipment", "failed") in rows
    assert rows[-3:] == [
        ("↩ process_payment", "compensated"),
        ("↩ reserve_inventory", "compensated"),
        ("saga failed, compensated", ""),
    ]
    assert shown["journal"][0]["kind"] == "saga_started"


def test_show_unknown_id_exits_3_with_a_message(cwd: Path) -> None:
    result = sagakit("show", "no-such-saga", cwd=cwd)
    assert result.returncode == 3
    assert "no saga with id 'no-such-saga'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_reading_a_missing_database_creates_nothing(tmp_path: Path) -> None:
    result = sagakit("list", "--db", "sqlite:///missing.db", cwd=tmp_path)
    assert result.returncode == 3
    assert "no database" in result.stderr
    assert not (tmp_path / "missing.db").exists()


def test_migrate_prints_the_schema_version(tmp_path: Path) -> None:
    result = sagakit("migrate", "--db", "sqlite:///fresh.db", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    latest = migrations()[-1][0]
    assert f"schema version {latest} (up to date)" in result.stdout
    assert (tmp_path / "fresh.db").exists()
    assert sagakit("list", "--db", "sqlite:///fresh.db", cwd=tmp_path).stdout.strip() == (
        "no sagas match"
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("bad:thing", "cannot import 'bad'"),
        ("sagakit", "is not MODULE:ATTRIBUTE"),
        ("sagakit.examples.order_fulfillment:nothing", "has no attribute 'nothing'"),
        ("sagakit.app:App", "not a sagakit.App"),
    ],
)
def test_worker_with_a_bad_app_exits_with_a_message(
    tmp_path: Path, target: str, message: str
) -> None:
    result = sagakit("worker", "--app", target, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_timeline_pairs_attempts_and_marks_interrupted_ones() -> None:
    def entry(at: float, kind: Kind, seq: int | None = None, attempt: int | None = None,
              **fields: Any) -> Entry:  # fmt: skip
        step = {0: "reserve", 1: "charge"}.get(seq or 0) if seq is not None else None
        return Entry(saga_id="s", index=int(at * 10), kind=kind, at=at, seq=seq, step=step,
                     attempt=attempt, **fields)  # fmt: skip

    oops = {"type": "Down", "message": "try later"}
    entries = [
        entry(0.0, Kind.SAGA_STARTED),
        entry(0.1, Kind.STEP_STARTED, 0, 1),
        entry(0.2, Kind.STEP_STARTED, 0, 1),  # the worker died; the same attempt again
        entry(0.3, Kind.STEP_RETRYING, 0, 1, error=oops, data={"retry_in": 0.05}),
        entry(0.4, Kind.STEP_STARTED, 0, 2),
        entry(0.5, Kind.STEP_COMPLETED, 0, 2),
        entry(0.6, Kind.STEP_STARTED, 1, 1),
        entry(0.7, Kind.STEP_FAILED, 1, 1, error=oops),
        entry(0.8, Kind.SAGA_COMPENSATING),
        entry(0.9, Kind.COMPENSATION_STARTED, 0, 1),
        entry(1.0, Kind.COMPENSATION_STARTED, 0, 2),
        entry(1.1, Kind.COMPENSATION_COMPLETED, 0, 2),
        entry(1.2, Kind.SAGA_FAILED),
    ]
    rows = timeline(entries, active=False)
    assert [(r.what, r.attempt, r.outcome) for r in rows] == [
        ("saga started", None, ""),
        ("reserve", 1, "interrupted"),
        ("reserve", 1, "retrying"),
        ("reserve", 2, "completed"),
        ("charge", 1, "failed"),
        ("compensating", None, ""),
        ("↩ reserve", 1, "interrupted"),
        ("↩ reserve", 2, "compensated"),
        ("saga failed, compensated", None, ""),
    ]
    assert rows[2].took == pytest.approx(0.1)
    assert rows[2].detail == "Down: try later; retry in 0.050 s"
    assert rows[4].detail == "Down: try later"
    running = timeline(entries[:2], active=True)
    assert [(r.what, r.outcome) for r in running] == [("saga started", ""), ("reserve", "running")]


CHECKED_APP = """
import asyncio
from sagakit import App

app = App("sqlite:///check.db", poll_interval=0.05)
VERSION = {version}


async def hold(ctx, data):
    await asyncio.sleep(3600)


async def other(ctx, data):
    return "other"


@app.saga("Order")
async def order(ctx, data):
    if VERSION == 2:
        await ctx.step(other, data)
    return await ctx.step(hold, data)


async def leave_one_running():
    handle = await app.start("Order", {{"n": 1}})
    for _ in range(300):
        if any(e.step == "hold" for e in await app.journal(handle.id)):
            break
        await asyncio.sleep(0.01)
    await app.close()
"""


def test_check_exits_1_for_a_workflow_that_would_break(tmp_path: Path) -> None:
    (tmp_path / "v1.py").write_text(CHECKED_APP.format(version=1))
    (tmp_path / "v2.py").write_text(CHECKED_APP.format(version=2))
    started = subprocess.run(
        [sys.executable, "-c", "import asyncio, v1; asyncio.run(v1.leave_one_running())"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr

    same = sagakit("check", "--app", "v1:app", cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert "1 unfinished sagas checked: all resume with this code" in same.stdout

    changed = sagakit("check", "--app", "v2:app", "--json", cwd=tmp_path)
    assert changed.returncode == 1, changed.stderr
    report = json.loads(changed.stdout)
    assert report["checked"] == 1
    assert (
        "NonDeterminism" in report["broken"][0]["reason"]
        or "'other'" in (report["broken"][0]["reason"])
    )
