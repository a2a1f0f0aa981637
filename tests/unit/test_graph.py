"""Mermaid flowcharts of saga definitions and of recorded runs: the text, line by line."""

from __future__ import annotations

import re
from typing import Any

import pytest

from sagakit.definition import Saga, parallel, step
from sagakit.errors import ConfigurationError
from sagakit.graph import escape, mermaid, mermaid_from_journals
from sagakit.journal import Entry, Kind

# -- what plausible Mermaid looks like ---------------------------------------------------------

_ID = r"[A-Za-z_][A-Za-z0-9_]*"
_TEXT = r'"(?:[^"#<>]|#\d+;)*"'  # a quoted label: no raw quote, '<' or '>', '#' only as '#nn;'
_SHAPES = [
    r"\(\[{t}\]\)",
    r"\[{t}\]",
    r"\{{\{{{t}\}}\}}",
    r"\({t}\)",
    r"\(\({t}\)\)",
    r">{t}\]",
    r"\[\[{t}\]\]",
]
_STATEMENTS = [
    r"flowchart TD",
    r"%%[^{}]*",
    rf"{_ID}(?:{'|'.join(s.format(t=_TEXT) for s in _SHAPES)})",
    rf"{_ID} (?:-->|-\.->)(?:\|{_TEXT}\|)? {_ID}",
    rf"subgraph {_ID}\[{_TEXT}\]",
    r"end",
    rf"classDef {_ID} [a-z-]+:[^;\s]+(?:,[a-z-]+:[^;,]+)*",
    rf"class {_ID}(?:,{_ID})* {_ID}",
]
_RESERVED = {"end", "subgraph", "graph", "flowchart", "class", "classDef", "style", "click"}


def check_syntax(text: str) -> list[str]:
    """The chart's lines, stripped, after checking each is a statement Mermaid accepts, that
    subgraphs close, and that edges join ids that were declared."""
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == "flowchart TD"
    depth, declared, used = 0, set(), set()
    for line in lines:
        assert any(re.fullmatch(s, line) for s in _STATEMENTS), f"not Mermaid: {line!r}"
        if line.startswith("subgraph "):
            depth += 1
            declared.add(line.split()[1].split("[")[0])
        elif line == "end":
            depth -= 1
            assert depth >= 0
        elif "-->" in line or "-.->" in line:
            used.update((line.split()[0], line.split()[-1]))
        elif re.match(rf"{_ID}[\[({{>]", line):
            declared.add(re.match(_ID, line)[0])  # type: ignore[index]
    assert depth == 0
    assert used <= declared, used - declared
    assert not declared & _RESERVED
    return lines


def act(ctx: Any, data: Any) -> None:
    return None


def undo(ctx: Any, data: Any, result: Any) -> None:
    return None


# -- declarative sagas -------------------------------------------------------------------------


def test_a_linear_saga_has_a_reverse_compensation_chain() -> None:
    saga = Saga(
        "Order",
        steps=[
            step("reserve", act, compensate=undo),
            step("validate", act),  # nothing to undo: the chain skips it
            step("charge", act, compensate=undo),
            step("ship", act, compensate=undo),
        ],
    )
    lines = check_syntax(mermaid(saga))
    assert lines[1] == "%% saga Order v1: declared steps"
    for node in (
        'start(["start"])',
        's0["reserve"]',
        's1["validate"]',
        's2["charge"]',
        's3["ship"]',
        'u0("undo reserve")',
        'u2("undo charge")',
        'u3("undo ship")',
        'completed(["completed"])',
        'failed(["failed (compensated)"])',
    ):
        assert node in lines
    assert not any(line.startswith("u1") for line in lines)
    forward = ["start --> s0", "s0 --> s1", "s1 --> s2", "s2 --> s3", "s3 --> completed"]
    assert [line for line in lines if " --> " in line] == forward
    assert [line for line in lines if "-.->" in line] == [
        's0 -.->|"fails"| failed',
        "u0 -.-> failed",
        's1 -.->|"fails"| u0',
        's2 -.->|"fails"| u0',
        "u2 -.-> u0",
        's3 -.->|"fails"| u2',
        "u3 -.-> u2",
    ]
    assert "needs_attention" not in "\n".join(lines)
    assert "class u0,u2,u3 undo" in lines


def test_a_parallel_group_is_a_subgraph_and_is_undone_at_once() -> None:
    saga = Saga(
        "Trip",
        steps=[
            step("book", act, compensate=undo),
            parallel(
                step("flight", act, compensate=undo),
                step("hotel", act, compensate=undo),
                step("notify", act),
            ),
            step("pay", act, compensate=undo),
            parallel(step("email", act), step("sms", act, compensate=undo)),
        ],
    )
    text = mermaid(saga)
    lines = check_syntax(text)
    assert 'subgraph g1["in parallel"]\n        s1["flight"]\n        s2["hotel"]\n' in text
    assert (
        'subgraph ug1["undo at once"]\n        u1("undo flight")\n        u2("undo hotel")\n'
        in text
    )
    # The second group has one compensation: a node of its own, no subgraph.
    assert 'subgraph g3["in parallel"]' in lines
    assert "subgraph ug3" not in text
    for edge in (
        "start --> s0",
        "s0 --> g1",
        "g1 --> s4",
        "s4 --> g3",
        "g3 --> completed",
        's0 -.->|"fails"| failed',
        'g1 -.->|"fails"| ug1',
        "ug1 -.-> u0",
        's4 -.->|"fails"| ug1',
        "u4 -.-> ug1",
        'g3 -.->|"fails"| u6',
        "u6 -.-> u4",
    ):
        assert edge in lines, edge
    # Members are only in their subgraph; no node is drawn twice.
    assert sum(line.startswith('s1["') for line in lines) == 1


def test_pivot_and_retriable_steps() -> None:
    saga = Saga(
        "Payout",
        steps=[
            step("hold", act, compensate=undo),
            step("transfer", act, pivot=True),
            step("receipt", act, retriable=True),
            parallel(step("ledger", act, retriable=True), step("notify", act, retriable=True)),
        ],
    )
    lines = check_syntax(mermaid(saga))
    for expected in (
        's1{{"transfer (pivot)"}}',
        's2["receipt (retriable)"]',
        's3["ledger (retriable)"]',
        'needs_attention(["needs_attention"])',
        's1 -.->|"fails"| u0',
        's2 -.->|"fails for good"| needs_attention',
        'g3 -.->|"fails for good"| needs_attention',
        "class s1 pivot",
    ):
        assert expected in lines, expected
    # Past the pivot nothing is compensated, and no failure leads to `failed` but through undo.
    assert not [line for line in lines if re.match(r"(s2|s3|s4|g3) -\.->.*(u0|failed)", line)]
    assert 's0 -.->|"fails"| failed' in lines


def test_nasty_names_are_escaped_and_ids_come_from_positions() -> None:
    nasty = 'pay "now" <b>[x]{y}(z) #1; a|b %% end\\n `x` $$'
    saga = Saga('We"ird<>', steps=[step(nasty, act, compensate=undo), step("end", act)])
    text = mermaid(saga)
    lines = check_syntax(text)
    label = lines[lines.index('start(["start"])') + 1]
    assert label.startswith('s0["pay #34;now#34; #60;b#62;#91;x#93;#123;y#125;(z) #35;1#59;')
    assert "#37;#37; end#92;n #96;x#96; #36;#36;" in label
    assert 'u0("undo pay #34;now#34;' in text
    assert 's1["end"]' in lines
    assert "%% saga We#34;ird#60;#62; v1: declared steps" in lines


def test_escape_keeps_words_and_unicode_letters() -> None:
    assert escape("reserve_inventory") == "reserve_inventory"
    assert escape("réserver 2") == "réserver 2"
    assert escape("reserve#2") == "reserve#35;2"
    assert escape("a\nb\tc") == "a b c"


def test_a_code_first_saga_has_no_static_graph() -> None:
    async def flow(ctx: Any, data: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"code-first.*recorded runs"):
        mermaid(Saga("Flow", workflow=flow))


# -- code-first sagas, from hand-made journals -------------------------------------------------


class Journal:
    """Builds a journal the way the engine writes it; each call appends an entry."""

    def __init__(self, saga_id: str) -> None:
        self.saga_id = saga_id
        self.entries: list[Entry] = []
        self.seqs: dict[str, int] = {}
        self.add(Kind.SAGA_STARTED)

    def add(self, kind: Kind, **fields: Any) -> Journal:
        self.entries.append(
            Entry(saga_id=self.saga_id, index=len(self.entries), kind=kind, at=100.0, **fields)
        )
        return self

    def seq(self, name: str) -> int:
        return self.seqs.setdefault(name, len(self.seqs))

    def step(self, kind: Kind, name: str, attempt: int = 1, **data: Any) -> Journal:
        return self.add(kind, seq=self.seq(name), step=name, attempt=attempt, data=data or None)

    def ran(self, *names: str, **data: Any) -> Journal:
        for name in names:
            self.step(Kind.STEP_STARTED, name, **data).step(Kind.STEP_COMPLETED, name, **data)
        return self

    def undid(self, *names: str) -> Journal:
        for name in names:
            self.add(Kind.COMPENSATION_STARTED, seq=self.seqs[name], step=name, attempt=1)
            self.add(Kind.COMPENSATION_COMPLETED, seq=self.seqs[name], step=name, attempt=1)
        return self


def test_two_runs_that_took_different_branches() -> None:
    express = Journal("1").ran("reserve", "express_ship").add(Kind.SAGA_COMPLETED).entries
    standard = Journal("2").ran("reserve", "ship", "notify").add(Kind.SAGA_COMPLETED).entries
    again = Journal("3").ran("reserve", "ship", "notify").add(Kind.SAGA_COMPLETED).entries
    lines = check_syntax(mermaid_from_journals("Order", [express, standard, again]))
    assert lines[1] == "%% saga Order: drawn from 3 recorded runs"
    for expected in (
        'n0["reserve"]',
        'n1["express_ship"]',
        'n2["ship"]',
        'n3["notify"]',
        'start -->|"3 runs"| n0',
        'n0 -->|"1 run"| n1',
        'n1 -->|"1 run"| completed',
        'n0 -->|"2 runs"| n2',
        'n2 -->|"2 runs"| n3',
        'n3 -->|"2 runs"| completed',
    ):
        assert expected in lines, expected
    assert not [line for line in lines if "-.->" in line]


def test_a_compensated_run_draws_its_failure_and_undo_chain() -> None:
    ok = Journal("1").ran("reserve", "charge", "ship").add(Kind.SAGA_COMPLETED).entries
    failed = (
        Journal("2")
        .ran("reserve", "charge")
        .step(Kind.STEP_STARTED, "ship")
        .step(Kind.STEP_RETRYING, "ship")
        .step(Kind.STEP_STARTED, "ship", attempt=2)
        .step(Kind.STEP_FAILED, "ship", attempt=2)
        .add(Kind.SAGA_COMPENSATING)
        .undid("charge", "reserve")
        .add(Kind.SAGA_FAILED)
        .entries
    )
    lines = check_syntax(mermaid_from_journals("Order", [ok, failed]))
    for expected in (
        'u3("undo charge")',
        'u4("undo reserve")',
        'n1 -->|"2 runs"| n2',
        'n2 -->|"1 run"| completed',
        'n2 -.->|"fails, 1 run"| u3',
        'u3 -.->|"1 run"| u4',
        'u4 -.->|"1 run"| failed',
        "class u3,u4 undo",
    ):
        assert expected in lines, expected
    assert sum(line.startswith('n2["ship"]') for line in lines) == 1  # a retry is one node


def test_parallel_steps_timers_signals_and_children_from_journals() -> None:
    run = Journal("1")
    entries = (
        run.ran("reserve")
        .add(Kind.TIMER_STARTED, seq=run.seq("timer"), data={"until": 100.0 + 3600})
        .add(Kind.TIMER_FIRED, seq=run.seq("timer"))
        .step(Kind.STEP_STARTED, "flight", group=7)
        .step(Kind.STEP_STARTED, "hotel", group=7)
        .step(Kind.STEP_COMPLETED, "hotel", group=7)
        .step(Kind.STEP_COMPLETED, "flight", group=7)
        .add(Kind.SIGNAL_WAITING, seq=run.seq("signal"), data={"name": 'ok"?', "until": 500.0})
        .add(Kind.SIGNAL_RECEIVED, seq=run.seq("signal"))
        .step(Kind.STEP_STARTED, "pay", child="c-1", type="Payment")
        .step(Kind.STEP_FAILED, "pay")
        .add(Kind.SAGA_COMPENSATING)
        .add(Kind.COMPENSATION_STARTED, seq=run.seq("flight"), step="flight", attempt=1)
        .add(Kind.COMPENSATION_STARTED, seq=run.seq("hotel"), step="hotel", attempt=1)
        .add(Kind.COMPENSATION_COMPLETED, seq=run.seq("hotel"), step="hotel", attempt=1)
        .add(Kind.COMPENSATION_COMPLETED, seq=run.seq("flight"), step="flight", attempt=1)
        .undid("reserve")
        .add(Kind.SAGA_FAILED)
        .entries
    )
    text = mermaid_from_journals("Trip", [entries])
    lines = check_syntax(text)
    assert 'subgraph g0["in parallel"]\n        n2["flight"]\n        n3["hotel"]\n    end' in text
    assert (
        'subgraph ug1["undo at once"]\n        u6("undo flight")\n        u7("undo hotel")' in text
    )
    for expected in (
        'n1(("sleep 1 h"))',
        'n4>"wait for signal ok#34;? (with timeout)"]',
        'n5[["pay: child saga Payment"]]',
        'n0 -->|"1 run"| n1',
        'n1 -->|"1 run"| g0',
        'g0 -->|"1 run"| n4',
        'n4 -->|"1 run"| n5',
        'n5 -.->|"fails, 1 run"| ug1',
        'ug1 -.->|"1 run"| u8',
        'u8 -.->|"1 run"| failed',
    ):
        assert expected in lines, expected


def test_a_run_stopped_inside_a_group_joins_the_whole_group() -> None:
    full = Journal("1").ran("a").ran("b", "c", group=1).add(Kind.SAGA_COMPLETED).entries
    partial = Journal("2").ran("a").step(Kind.STEP_STARTED, "b", group=1).entries  # running
    text = mermaid_from_journals("G", [full, partial])
    lines = check_syntax(text)
    assert 'n0 -->|"2 runs"| g0' in lines
    assert 'g0 -->|"1 run"| completed' in lines
    assert text.count("subgraph") == 1


def test_parked_and_cancelled_runs() -> None:
    parked = (
        Journal("1")
        .ran("a", "b")
        .step(Kind.STEP_STARTED, "c")
        .step(Kind.STEP_FAILED, "c")
        .add(Kind.COMPENSATION_STARTED, seq=1, step="b", attempt=1)
        .add(Kind.COMPENSATION_EXHAUSTED, seq=1, step="b", attempt=1)
        .entries
    )
    cancelled = (
        Journal("2").ran("a").add(Kind.CANCEL_REQUESTED).undid("a").add(Kind.SAGA_CANCELLED).entries
    )
    lines = check_syntax(mermaid_from_journals("P", [parked, cancelled]))
    for expected in (
        'u3 -.->|"1 run"| needs_attention',
        'n0 -.->|"cancelled, 1 run"| u4',
        'u4 -.->|"1 run"| cancelled',
        'cancelled(["cancelled (compensated)"])',
    ):
        assert expected in lines, expected


def test_no_runs_draws_only_the_start() -> None:
    assert check_syntax(mermaid_from_journals("None", [])) == [
        "flowchart TD",
        "%% saga None: drawn from 0 recorded runs",
        'start(["start"])',
    ]


def test_a_signal_that_timed_out_is_the_failure_that_compensates() -> None:
    run = Journal("1").ran("submit")
    seq = run.seq("signal")
    wait = {"name": "approve", "until": 160.0, "timeout": 60}
    entries = (
        run.add(Kind.SIGNAL_WAITING, seq=seq, data=wait)
        .add(Kind.SIGNAL_TIMED_OUT, seq=seq)
        .undid("submit")
        .add(Kind.SAGA_FAILED)
        .entries
    )
    lines = check_syntax(mermaid_from_journals("Approval", [entries]))
    assert 'n1>"wait for signal approve (timeout 1 min)"]' in lines
    assert 'n1 -.->|"times out, 1 run"| u2' in lines
