"""The benchmark scripts of ``make bench`` still run: each with tiny sizes, as a subprocess.

They measure nothing here (the figures of a test run mean nothing); they would otherwise only
be found broken by the next person who runs ``make bench``. ``run.py`` runs without DBOS,
which needs the bench extra that ``make test`` does not install.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def bench(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, script, *args],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_run_py(pg_base: str) -> None:
    out = bench("run.py", "--no-dbos", "--sequential", "20", "--concurrent", "70",
                "--pg", pg_base)  # fmt: skip
    assert "µs/step added" in out


def test_waiting_py(pg_base: str) -> None:
    out = bench("waiting.py", "--waiting", "40", "--sagas", "30", "--pg", pg_base)
    assert "idle claim" in out
    assert out.count("40") >= 2  # a row per backend with the backlog


def test_remote_py_on_the_memory_broker() -> None:
    out = bench("remote.py", "--sagas", "3", "--concurrent", "12", "--in-flight", "4",
                "--warmup", "2", "--outbox", "12", "--backends", "sqlite",
                "--brokers", "memory")  # fmt: skip
    assert "Outbox relay" in out


def test_workers_py(pg_base: str) -> None:
    out = bench("workers.py", "--n", "40", "--in-flight", "20", "--pg", pg_base)
    assert "recovery" in out.lower()


def test_signals_py(pg_base: str) -> None:
    out = bench("signals.py", "--signals", "60", "--pg", pg_base)
    assert "median" in out
