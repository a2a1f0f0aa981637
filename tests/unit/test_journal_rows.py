"""row_changes() must agree with project(): the saga row is the journal's projection."""

from __future__ import annotations

import random
from typing import Any

import pytest

from sagakit.journal import Entry, Kind, SagaState, project, row_changes

ROW_COLUMNS = ("state", "current_step", "output", "error")

_ERRORING = (
    Kind.STEP_RETRYING,
    Kind.STEP_FAILED,
    Kind.SAGA_COMPENSATING,
    Kind.COMPENSATION_RETRYING,
    Kind.COMPENSATION_EXHAUSTED,
    Kind.SAGA_PARKED,
)
_PER_STEP = (
    Kind.STEP_STARTED,
    Kind.STEP_RETRYING,
    Kind.STEP_COMPLETED,
    Kind.STEP_FAILED,
    Kind.COMPENSATION_STARTED,
    Kind.COMPENSATION_RETRYING,
    Kind.COMPENSATION_COMPLETED,
    Kind.COMPENSATION_EXHAUSTED,
)


def _entry(index: int, kind: Kind, **fields: Any) -> Entry:
    return Entry(saga_id="s", index=index, kind=kind, at=500.0 + index, **fields)


def random_journal(rng: random.Random) -> list[Entry]:
    """A journal of random entries, some of them in orders no engine would write."""
    entries = [_entry(0, Kind.SAGA_STARTED, payload='{"in":1}')]
    kinds = [k for k in Kind if k is not Kind.SAGA_STARTED]
    for index in range(1, rng.randint(1, 40)):
        kind = rng.choice(kinds)
        fields: dict[str, Any] = {}
        if kind.value.startswith(("timer_", "signal_")):
            fields["seq"] = rng.randint(0, 5)
            fields["data"] = {"name": "n", "until": 1.0, "signal_id": f"s{index}"}
        if kind is Kind.CANCEL_REQUESTED:
            fields["data"] = rng.choice([{"reason": "r"}, {"reason": "r", "resume": "running"}])
        if kind in _PER_STEP or kind is Kind.VALUE_RECORDED:
            seq = rng.randint(0, 5)
            fields["seq"] = seq
            if kind is Kind.VALUE_RECORDED:
                fields["data"] = {"name": "random", "value": rng.random()}
            else:
                fields["step"] = f"step{seq}"
                fields["attempt"] = rng.randint(1, 3)
        if kind in (Kind.STEP_COMPLETED, Kind.SAGA_COMPLETED):
            fields["payload"] = rng.choice([None, '"x"', f'{{"n":{index}}}'])
        if kind in _ERRORING and rng.random() < 0.8:
            fields["error"] = {"type": "ValueError", "message": f"e{index}"}
        if kind is Kind.OPERATOR_RETRY:
            fields["data"] = rng.choice(
                [None, {}, {"resume": "running"}, {"resume": "compensating"}]
            )
        entries.append(_entry(index, kind, **fields))
    return entries


def fold_rows(entries: list[Entry], rng: random.Random) -> dict[str, Any]:
    """The row as the store keeps it: created with the first entry, then updated by the
    row_changes() of each appended batch."""
    row: dict[str, Any] = {
        "state": SagaState.STARTED,
        "current_step": None,
        "output": None,
        "error": None,
        "updated_at": entries[0].at,
    }
    rest = entries[1:]
    while rest:
        size = rng.randint(1, 5)
        batch, rest = rest[:size], rest[size:]
        row.update(row_changes(batch))
    return row


def projected_row(entries: list[Entry]) -> dict[str, Any]:
    p = project(entries)
    return {"state": p.state, "current_step": p.current_step, "output": p.output, "error": p.error}


@pytest.mark.parametrize("seed", range(300))
def test_row_changes_in_random_batches_agree_with_project(seed: int) -> None:
    rng = random.Random(seed)
    entries = random_journal(rng)
    row = fold_rows(entries, rng)
    assert {c: row[c] for c in ROW_COLUMNS} == projected_row(entries)
    assert row["updated_at"] == entries[-1].at


@pytest.mark.parametrize("seed", range(50))
def test_row_changes_of_a_whole_journal_agree_with_project(seed: int) -> None:
    entries = random_journal(random.Random(seed))
    changes = row_changes(entries)
    defaults = {"state": SagaState.STARTED, "current_step": None, "output": None, "error": None}
    assert {c: changes.get(c, defaults[c]) for c in ROW_COLUMNS} == projected_row(entries)


def _journal(*specs: tuple[Kind, dict[str, Any]]) -> list[Entry]:
    return [_entry(i, kind, **fields) for i, (kind, fields) in enumerate(specs)]


HAPPY = _journal(
    (Kind.SAGA_STARTED, {}),
    (Kind.STEP_STARTED, {"seq": 0, "step": "reserve", "attempt": 1}),
    (Kind.STEP_COMPLETED, {"seq": 0, "step": "reserve", "attempt": 1, "payload": '"r"'}),
    (Kind.SAGA_COMPLETED, {"payload": '{"reserve":"r"}'}),
)
COMPENSATED = _journal(
    (Kind.SAGA_STARTED, {}),
    (Kind.STEP_STARTED, {"seq": 0, "step": "reserve", "attempt": 1}),
    (Kind.STEP_COMPLETED, {"seq": 0, "step": "reserve", "attempt": 1, "payload": '"r"'}),
    (Kind.STEP_STARTED, {"seq": 1, "step": "pay", "attempt": 1}),
    (Kind.STEP_FAILED, {"seq": 1, "step": "pay", "attempt": 1, "error": {"message": "declined"}}),
    (Kind.SAGA_COMPENSATING, {"error": {"message": "declined"}}),
    (Kind.COMPENSATION_STARTED, {"seq": 0, "step": "reserve", "attempt": 1}),
    (Kind.COMPENSATION_COMPLETED, {"seq": 0, "step": "reserve", "attempt": 1}),
    (Kind.SAGA_FAILED, {}),
)
RETRIED_BY_OPERATOR = _journal(
    (Kind.SAGA_STARTED, {}),
    (Kind.STEP_STARTED, {"seq": 0, "step": "ship", "attempt": 1}),
    (Kind.SAGA_PARKED, {"error": {"message": "changed code"}}),
    (Kind.OPERATOR_RETRY, {"data": {"resume": "running"}}),
    (Kind.VALUE_RECORDED, {"seq": 1, "data": {"name": "now", "value": "t"}}),
)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param(
            HAPPY,
            {
                "state": SagaState.COMPLETED,
                "current_step": "reserve",
                "output": '{"reserve":"r"}',
                "error": None,
            },
            id="happy",
        ),
        pytest.param(
            COMPENSATED,
            {
                "state": SagaState.FAILED,
                "current_step": "pay",  # where it failed: compensations leave it alone
                "output": None,
                "error": {"message": "declined"},
            },
            id="compensated",
        ),
        pytest.param(
            RETRIED_BY_OPERATOR,
            {
                "state": SagaState.RUNNING,
                "current_step": "ship",
                "output": None,
                "error": {"message": "changed code"},
            },
            id="operator-retry",
        ),
    ],
)
def test_known_journals_project_and_fold_to_the_expected_row(
    entries: list[Entry], expected: dict[str, Any]
) -> None:
    assert projected_row(entries) == expected
    for seed in range(5):
        row = fold_rows(entries, random.Random(seed))
        assert {c: row[c] for c in ROW_COLUMNS} == expected


def test_row_changes_reports_only_what_changes() -> None:
    assert row_changes([]) == {}
    value = _entry(7, Kind.VALUE_RECORDED, seq=3, data={"name": "uuid", "value": "u"})
    assert row_changes([value]) == {"updated_at": value.at}
    retry = _entry(8, Kind.OPERATOR_RETRY)
    assert row_changes([retry]) == {"state": SagaState.COMPENSATING, "updated_at": retry.at}
    done = _entry(9, Kind.SAGA_COMPLETED, payload=None)
    assert row_changes([done]) == {
        "state": SagaState.COMPLETED,
        "output": None,
        "updated_at": done.at,
    }
