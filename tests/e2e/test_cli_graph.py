"""``sagakit graph TYPE --app module:app`` run as a subprocess, in a temporary directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from sagakit.examples.order_fulfillment import STEPS

_ID = r"[A-Za-z_][A-Za-z0-9_]*"
_TEXT = r'"(?:[^"#<>]|#\d+;)*"'
# Every statement `sagakit graph` writes: header, comment, node, edge, subgraph, end, classes.
_STATEMENT = re.compile(
    rf"flowchart TD|%%[^{{}}]*"
    rf"|{_ID}(?:\(\[{_TEXT}\]\)|\[{_TEXT}\]|\{{\{{{_TEXT}\}}\}}|\({_TEXT}\)|\(\({_TEXT}\)\)"
    rf"|>{_TEXT}\]|\[\[{_TEXT}\]\])"
    rf"|{_ID} (?:-->|-\.->)(?:\|{_TEXT}\|)? {_ID}"
    rf"|subgraph {_ID}\[{_TEXT}\]|end"
    rf"|classDef {_ID} [a-z-]+:.+|class {_ID}(?:,{_ID})* {_ID}"
)


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


def assert_mermaid(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == "flowchart TD", text
    for line in lines:
        assert _STATEMENT.fullmatch(line), f"not Mermaid: {line!r}"
    assert lines.count("end") == sum(line.startswith("subgraph ") for line in lines)
    return lines


def test_graph_of_the_declarative_order_fulfillment(tmp_path: Path) -> None:
    result = sagakit(
        "graph", "OrderFulfillment", "--app", "sagakit.examples.order_fulfillment:app", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("flowchart")
    lines = assert_mermaid(result.stdout)
    for name in STEPS:
        assert f'["{name}"]' in result.stdout
        assert f'("undo {name}")' in result.stdout
    assert "s3 --> completed" in lines
    assert 's1 -.->|"fails"| u0' in lines
    assert "\x1b" not in result.stdout  # plain text, no terminal colours
    assert list(tmp_path.iterdir()) == []  # a declarative graph needs no database


def test_graph_of_an_unknown_type_says_which_exist(tmp_path: Path) -> None:
    result = sagakit(
        "graph", "Nope", "--app", "sagakit.examples.order_fulfillment:app", cwd=tmp_path
    )
    assert result.returncode == 3  # not found
    assert result.stdout == ""
    assert "unknown saga type 'Nope'" in result.stderr
    assert "OrderFulfillment" in result.stderr
    version = sagakit(
        "graph",
        "OrderFulfillment",
        "--version",
        "9",
        "--app",
        "sagakit.examples.order_fulfillment:app",
        cwd=tmp_path,
    )
    assert version.returncode == 3
    assert "no version 9 registered; the latest is 1" in version.stderr


_FLOWS = """
from sagakit import App

app = App({url!r})


def reserve(ctx, data):
    return "r-1"


def release(ctx, data, result):
    return None


def charge(ctx, data):
    if data["decline"]:
        raise ValueError("card declined")
    return "p-1"


def refund(ctx, data, result):
    return None


def ship(ctx, data):
    return "standard"


def express(ctx, data):
    return "express"


@app.saga("Checkout")
async def checkout(ctx, data):
    await ctx.step(reserve, data, compensate=release)
    await ctx.step(charge, data, compensate=refund)
    if data["express"]:
        return await ctx.step(express, data)
    return await ctx.step(ship, data)
"""

_RUN = """
import asyncio

from flows import app


async def main():
    async with app:
        for data in ({"express": False, "decline": False}, {"express": True, "decline": False},
                     {"express": False, "decline": False}, {"express": False, "decline": True}):
            handle = await app.start("Checkout", data)
            try:
                await handle.result(timeout=30)
            except Exception:
                pass


asyncio.run(main())
"""


def test_graph_of_a_code_first_saga_comes_from_its_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'flows.db'}"
    (tmp_path / "flows.py").write_text(textwrap.dedent(_FLOWS.format(url=url)))
    before = sagakit("graph", "Checkout", "--app", "flows:app", cwd=tmp_path)
    assert before.returncode == 3  # no recorded run to draw from
    assert "run one first" in before.stderr
    assert not (tmp_path / "flows.db").exists()

    ran = subprocess.run(
        [sys.executable, "-c", _RUN],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    result = sagakit("graph", "Checkout", "--app", "flows:app", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = assert_mermaid(result.stdout)
    assert lines[1] == "%% saga Checkout: drawn from 4 recorded runs"
    for expected in (
        'n0["reserve"]',
        'n1["charge"]',
        'n2["ship"]',
        'n3["express"]',
        'u4("undo reserve")',
        'start -->|"4 runs"| n0',
        'n0 -->|"4 runs"| n1',
        'n1 -->|"2 runs"| n2',
        'n1 -->|"1 run"| n3',
        'n2 -->|"2 runs"| completed',
        'n1 -.->|"fails, 1 run"| u4',
        'u4 -.->|"1 run"| failed',
    ):
        assert expected in lines, result.stdout
