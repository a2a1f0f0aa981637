"""The CLI's operator contract: exit codes, ``--json`` output, ``sagakit bench`` and shell
completion, each run as a ``python -m sagakit`` subprocess against real databases."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sagakit import App
from sagakit.cli_base import ExitCode, exit_code_of
from sagakit.errors import (
    BrokerUnavailable,
    ConfigurationError,
    DatabaseOwned,
    InvalidInput,
    InvalidSagaState,
    SagaNotFound,
    StepFailed,
    StoreUnavailable,
    UnknownSagaType,
)

PG = os.environ.get("SAGAKIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def sagakit(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SAGAKIT_", "_SAGAKIT"))}
    return subprocess.run(
        [sys.executable, "-m", "sagakit", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose sagakit.db holds a finished demo run (no kills)."""
    cwd = tmp_path_factory.mktemp("ops")
    result = sagakit("demo", "--orders", "20", "--kills", "0", cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return cwd


def rows(cwd: Path, *args: str) -> list[dict[str, Any]]:
    result = sagakit("list", "--json", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


def journal_lengths(cwd: Path) -> dict[str, int]:
    async def read() -> dict[str, int]:
        async with App(f"sqlite:///{cwd / 'sagakit.db'}", worker=False) as app:
            infos = await app.list(limit=1000)
            return {i.id: len(await app.journal(i.id)) for i in infos}

    return asyncio.run(read())


# -- exit codes --------------------------------------------------------------------------------


def test_exit_codes_by_kind_of_error() -> None:
    assert exit_code_of(SagaNotFound("x")) is ExitCode.NOT_FOUND
    assert exit_code_of(UnknownSagaType("X", [])) is ExitCode.NOT_FOUND
    refused = InvalidSagaState("s", "completed", "retry", "needs_attention")
    assert exit_code_of(refused) is ExitCode.REFUSED
    assert exit_code_of(StoreUnavailable("db", "down")) is ExitCode.UNAVAILABLE
    assert exit_code_of(BrokerUnavailable("amqp://", "down")) is ExitCode.UNAVAILABLE
    assert exit_code_of(DatabaseOwned("/x.db")) is ExitCode.UNAVAILABLE
    assert exit_code_of(ConfigurationError("bad url")) is ExitCode.USAGE
    assert exit_code_of(InvalidInput("T", int, "not a number")) is ExitCode.USAGE
    assert exit_code_of(StepFailed("s", "step", 1, {"type": "E"})) is ExitCode.FAILED


def test_each_failure_exits_with_its_code_and_writes_nothing(demo_dir: Path) -> None:
    completed = rows(demo_dir, "--state", "completed")[0]["id"]
    before = journal_lengths(demo_dir)

    unknown = sagakit("retry", "no-such-saga", cwd=demo_dir)
    assert unknown.returncode == ExitCode.NOT_FOUND == 3
    assert "no saga with id 'no-such-saga'" in unknown.stderr

    refused = sagakit("cancel", completed, cwd=demo_dir)
    assert refused.returncode == ExitCode.REFUSED == 4
    assert "completed" in refused.stderr
    assert sagakit("resolve", completed, "--note", "x", cwd=demo_dir).returncode == 4

    bad = sagakit("signal", completed, "go", "{nope", cwd=demo_dir)
    assert bad.returncode == ExitCode.USAGE == 2
    assert "PAYLOAD must be JSON" in bad.stderr
    assert sagakit("list", "--state", "bogus", cwd=demo_dir).returncode == 2  # click's own

    for result in (unknown, refused, bad):
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
    assert journal_lengths(demo_dir) == before


def test_an_unreachable_database_exits_5(tmp_path: Path) -> None:
    result = sagakit("list", "--db", "postgresql://postgres@127.0.0.1:1/test", cwd=tmp_path)
    assert result.returncode == ExitCode.UNAVAILABLE == 5
    assert "cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_the_exit_codes(tmp_path: Path) -> None:
    result = sagakit("--help", cwd=tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Exit codes: 0 done" in text
    assert "5 database or broker unreachable" in text


# -- --json ------------------------------------------------------------------------------------


def test_read_and_operator_commands_print_json(demo_dir: Path, tmp_path: Path) -> None:
    migrated = sagakit("migrate", "--json", "--db", f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    printed = json.loads(migrated.stdout)
    assert printed["database"] == f"sqlite:///{tmp_path / 'm.db'}"
    assert printed["schema_version"] >= 4

    app = "sagakit.examples.order_fulfillment:app"
    graph = sagakit("graph", "OrderFulfillment", "--app", app, "--json", cwd=tmp_path)
    assert graph.returncode == 0, graph.stderr
    drawn = json.loads(graph.stdout)
    assert drawn["type"] == "OrderFulfillment"
    assert drawn["version"] == 1
    assert drawn["mermaid"].startswith("flowchart")


_WAITER = """
from sagakit import App, Saga

app = App({url!r}, worker=False)


@app.saga("Waiter")
async def waiter(ctx, data):
    return await ctx.wait_for_signal("go")
"""


def test_operator_commands_print_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    (tmp_path / "waiter.py").write_text(_WAITER.format(url=url))

    async def start() -> str:
        sys.path.insert(0, str(tmp_path))
        try:
            from waiter import app  # type: ignore[import-not-found]
        finally:
            sys.path.remove(str(tmp_path))
        async with app:
            return (await app.start("Waiter", {})).id

    saga_id = asyncio.run(start())
    env = {"SAGAKIT_DATABASE_URL": url}
    sent = sagakit(
        "signal", saga_id, "go", '{"n": 1}', "--id", "s1", "--json", cwd=tmp_path, env=env
    )
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout) == {"saga_id": saga_id, "signal": "go", "sent": True}
    again = sagakit(
        "signal", saga_id, "go", '{"n": 1}', "--id", "s1", "--json", cwd=tmp_path, env=env
    )
    assert json.loads(again.stdout)["sent"] is False  # the same signal id is stored once
    cancelled = sagakit("cancel", saga_id, "--reason", "test", "--json", cwd=tmp_path, env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout) == {
        "saga_id": saga_id,
        "action": "cancel",
        "reason": "test",
    }


def test_list_pages_with_limit_and_offset(demo_dir: Path) -> None:
    every = [r["id"] for r in rows(demo_dir, "--limit", "1000")]
    assert [r["id"] for r in rows(demo_dir, "--limit", "5", "--offset", "3")] == every[3:8]
    assert rows(demo_dir, "--offset", str(len(every))) == []


def test_check_json_stays_clean_when_piped(demo_dir: Path) -> None:
    app = "sagakit.examples.order_fulfillment:app"
    result = sagakit("check", "--app", app, "--json", cwd=demo_dir)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["broken"] == []  # no progress bar mixed in


# -- bench -------------------------------------------------------------------------------------


def test_bench_on_a_scratch_sqlite_file(tmp_path: Path) -> None:
    result = sagakit("bench", "--sagas", "40", "--in-flight", "1", "--in-flight", "4", "--json",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert [f["in_flight"] for f in figures] == [1, 4]
    for f in figures:
        assert f["sagas"] == 40
        assert (f["completed"], f["compensated"]) == (36, 4)  # every 10th order is declined
        assert f["sagas_per_second"] > 0
        assert 0 < f["p50_ms"] <= f["p95_ms"]
        assert f["floor_sagas_per_second"] > f["sagas_per_second"]
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone, nothing else written


def test_bench_table_and_its_refusals(tmp_path: Path) -> None:
    table = sagakit("bench", "--sagas", "20", "--in-flight", "2", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "sagas/s" in table.stdout
    assert "SQLite" in table.stdout

    (tmp_path / "mine.db").write_bytes(b"")
    taken = sagakit("bench", "--db", f"sqlite:///{tmp_path / 'mine.db'}", cwd=tmp_path)
    assert taken.returncode == 2
    assert "exists" in taken.stderr
    odd = sagakit("bench", "--db", "mysql://x", cwd=tmp_path)
    assert odd.returncode == 2
    assert "neither" in odd.stderr
    schema = sagakit("bench", "--db", f"{PG}?schema=mine", cwd=tmp_path)
    assert schema.returncode == 2
    assert "leave ?schema= out" in schema.stderr


async def _bench_schemas() -> set[str]:
    conn = await asyncpg.connect(PG)
    try:
        found = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'sagakit_bench_%'"
        )
    finally:
        await conn.close()
    return {r["nspname"] for r in found}


async def test_bench_on_postgresql_drops_its_scratch_schema(tmp_path: Path) -> None:
    before = await _bench_schemas()
    result = await asyncio.to_thread(
        sagakit, "bench", "--db", PG, "--sagas", "30", "--in-flight", "3", "--json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    (figure,) = json.loads(result.stdout)
    assert (figure["in_flight"], figure["completed"], figure["compensated"]) == (3, 27, 3)
    assert await _bench_schemas() <= before  # made and dropped again


# -- completion --------------------------------------------------------------------------------


def complete(cwd: Path, words: str, *, db: str | None = None) -> list[str]:
    """What bash completion offers for the command line ``words`` (its last word typed)."""
    parts = words.split(" ")
    env = {"_SAGAKIT_COMPLETE": "bash_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(len(parts) - 1)}  # fmt: skip
    if db is not None:
        env["SAGAKIT_DATABASE_URL"] = db
    result = sagakit(cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    return [line.split(",", 1)[1] for line in result.stdout.splitlines() if line]


def test_completion_scripts_for_each_shell(tmp_path: Path) -> None:
    for shell, marker in (("bash", "complete -o nosort -F"), ("zsh", "#compdef sagakit"),
                          ("fish", "complete --no-files --command sagakit")):  # fmt: skip
        result = sagakit("completion", shell, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert marker in result.stdout
        assert "_SAGAKIT_COMPLETE" in result.stdout
    assert sagakit("completion", "tcsh", cwd=tmp_path).returncode == 2


def test_completion_of_commands_options_states_and_saga_ids(demo_dir: Path) -> None:
    assert complete(demo_dir, "sagakit s") == ["serve", "show", "signal"]
    assert "bench" in complete(demo_dir, "sagakit ")
    assert complete(demo_dir, "sagakit list --state needs") == ["needs_attention"]
    assert "--in-flight" in complete(demo_dir, "sagakit bench --")

    every = {r["id"] for r in rows(demo_dir)}
    offered = complete(demo_dir, "sagakit show ")
    assert set(offered) == every
    one = sorted(every)[0]
    assert complete(demo_dir, f"sagakit show {one[:8]}") == [
        i for i in every if i.startswith(one[:8])
    ]
    parked = {r["id"] for r in rows(demo_dir, "--state", "needs_attention")}
    assert every - parked  # so retry's completion must leave some out
    assert set(complete(demo_dir, "sagakit retry ")) == parked


def test_completion_without_a_database_offers_nothing_and_creates_nothing(tmp_path: Path) -> None:
    assert complete(tmp_path, "sagakit show ") == []
    assert complete(tmp_path, "sagakit show ", db="postgresql://postgres@127.0.0.1:1/test") == []
    assert list(tmp_path.iterdir()) == []
