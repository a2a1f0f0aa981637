"""What explore checks after each failure point's run. Each check returns its problems in words
(an empty list when all is well); none does I/O but the user's invariant."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sagakit.journal import Entry, Kind, SagaState
from sagakit.testing.faults import CallRecord

# The entries that commit an outcome a re-run must never redo, and whether they are a
# compensation's.
_OUTCOMES = {
    Kind.STEP_COMPLETED: False,
    Kind.STEP_FAILED: False,
    Kind.COMPENSATION_COMPLETED: True,
}


def acted(e: Entry) -> bool:
    """Whether ``e`` records a step that may have had its effect, and so is owed its
    compensation: it completed, or it was a remote step that timed out (``uncertain``)."""
    if e.kind is Kind.STEP_COMPLETED:
        return True
    return e.kind is Kind.STEP_FAILED and bool((e.data or {}).get("uncertain"))


def check_state(state: SagaState, expected: SagaState) -> list[str]:
    if state is expected:
        return []
    return [f"the saga ended {state}, expected {expected}"]


def check_reruns(calls: Sequence[CallRecord], commits: Sequence[tuple[Entry, int]]) -> list[str]:
    """Calls of an action (or compensation) made after its outcome was durable."""
    committed: dict[tuple[str, bool], int] = {}
    for e, tick in commits:
        compensation = _OUTCOMES.get(e.kind)
        if compensation is not None and e.step is not None:
            committed.setdefault((e.step, compensation), tick)
    problems = []
    for c in calls:
        done = committed.get((c.step, c.compensation))
        if done is not None and c.tick > done:
            what = "the compensation of step" if c.compensation else "step"
            problems.append(
                f"{what} {c.step!r} ran again (attempt {c.attempt}) after its outcome was durable"
            )
    return problems


def _first_seqs(journal: Iterable[Entry], kind: Kind) -> list[int]:
    seen: dict[int, None] = {}
    for e in journal:
        if e.kind is kind and e.seq is not None:
            seen.setdefault(e.seq, None)
    return list(seen)


def _blocks(order: Sequence[tuple[int, Any]]) -> list[set[int]]:
    """Consecutive steps of one parallel group become one block (any order among them)."""
    blocks: list[set[int]] = []
    last: Any = None
    for seq, group in order:
        if group is not None and group == last and blocks:
            blocks[-1].add(seq)
        else:
            blocks.append({seq})
        last = group
    return blocks


def _follows(started: Sequence[int], blocks: Sequence[set[int]]) -> bool:
    """Whether ``started`` is the blocks' order, or a prefix of it."""
    i = 0
    for block in blocks:
        chunk = started[i : i + len(block)]
        if not set(chunk) <= block:
            return False
        i += len(chunk)
        if len(chunk) < len(block):
            break
    return i == len(started)


def _acted_steps(
    journal: Sequence[Entry],
) -> tuple[dict[int, str], set[int], list[tuple[int, Any]]]:
    """The steps owed a compensation if they have one: name by seq, the seqs of those that
    timed out, and (seq, parallel group) in order of completion."""
    names: dict[int, str] = {}
    timed_out: set[int] = set()
    order: list[tuple[int, Any]] = []
    for e in journal:
        if acted(e) and e.seq is not None and e.seq not in names:
            names[e.seq] = e.step or "?"
            if e.kind is Kind.STEP_FAILED:
                timed_out.add(e.seq)
            order.append((e.seq, (e.data or {}).get("group")))
    return names, timed_out, order


def check_compensations(
    journal: Sequence[Entry], state: SagaState, compensable: Callable[[str], bool]
) -> list[str]:
    """Compensations ran in reverse completion order for exactly the completed steps that
    have one: all of them if the saga failed or was cancelled, none if it completed, and, if
    it needs attention, those due before the one that kept failing. A remote step that timed
    out counts as completed where its failure was journaled (see :func:`acted`)."""
    names, timed_out, order = _acted_steps(journal)
    started = _first_seqs(journal, Kind.COMPENSATION_STARTED)
    problems = [
        f"a compensation ran for step seq {seq}, which never completed nor timed out"
        for seq in started
        if seq not in names
    ]
    done = [e.seq for e in journal if e.kind is Kind.COMPENSATION_COMPLETED and e.seq is not None]
    twice = sorted({names.get(s, "?") for s in done if done.count(s) > 1})
    problems += [f"step {n!r} was compensated twice" for n in twice]
    owed = [(seq, g) for seq, g in reversed(order) if compensable(names[seq])]
    if state is SagaState.COMPLETED:
        problems += [
            f"the saga completed, yet {names.get(s, '?')!r} was compensated" for s in started
        ]
        return problems
    if not _follows(started, _blocks(owed)):
        want = [names[s] for s, _ in owed]
        got = [names.get(s, "?") for s in started]
        problems.append(f"compensations ran in the order {got}; reverse completion is {want}")
    if state in (SagaState.FAILED, SagaState.CANCELLED):
        missing = [s for s, _ in owed if s not in done]
        problems += [
            f"step {names[s]!r} "
            f"{'timed out (it may have acted)' if s in timed_out else 'completed'} "
            "but was never compensated"
            for s in missing
        ]
    return problems


def check_owed(journal: Sequence[Entry], compensable: Callable[[str], bool]) -> list[str]:
    """A saga stopped by a failing compensation lists every compensation still owed."""
    exhausted = [e for e in journal if e.kind is Kind.COMPENSATION_EXHAUSTED]
    if not exhausted:
        return []
    listed = (exhausted[-1].data or {}).get("owed")
    if not isinstance(listed, list):
        return []
    done = {e.seq for e in journal if e.kind is Kind.COMPENSATION_COMPLETED}
    completed = [e for e in journal if acted(e)]
    due = {e.step or "" for e in completed if e.seq not in done and compensable(e.step or "")}
    forgotten = sorted(n for n in due if n not in listed)
    return [f"compensation of {n!r} is owed but not listed in needs_attention" for n in forgotten]


async def check_invariant(invariant: Callable[[Any], Any] | None, run: Any) -> list[str]:
    """The user's invariant, sync or async: it fails by raising or returning a falsy value
    other than None."""
    if invariant is None:
        return []
    try:
        held = invariant(run)
        if inspect.isawaitable(held):
            held = await held
    except Exception as exc:
        return [_one_line(f"invariant: {type(exc).__name__}: {exc}".rstrip(": "))]
    if held is None or held:
        return []
    return [_one_line(f"invariant returned {held!r}")]


def _one_line(text: str, limit: int = 200) -> str:
    """The first line (a table row's worth): pytest's rewritten asserts add lines below it."""
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else line[: limit - 1] + "…"
