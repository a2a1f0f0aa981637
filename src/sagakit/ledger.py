"""The ledger of simulated services: what each call did, deduplicated by idempotency key.

The services of the shipped example (and of the crash tests) keep their own SQLite file, the
way a real payment provider keeps its own database. Every call is recorded with its
idempotency key and attempt; an effect is applied only when its key is new, and a repeated
call gets the stored outcome back. The ledger then answers, independently of sagakit's own
bookkeeping, whether anything happened twice or was left uncompensated.

Several worker processes share one ledger file (WAL mode, and a busy timeout for their
concurrent writes). Every call is recorded with the wall-clock time it started; after the run,
:meth:`Ledger.check` compares those times with the times of the outcome entries in sagakit's
journal (the same machine's clock), whatever database sagakit uses. A call that started after
its step's (or compensation's) outcome was written is a committed step run again, which must
never happen. The outcome entry's time is taken just before its commit, so a call between the
two counts too: it could only come from a worker the commit fences out, and then the entry
would not be in the journal.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagakit.journal import Entry, Kind, SagaState
from sagakit.workflow import StepContext

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL,
    saga_id TEXT NOT NULL,
    order_id TEXT NOT NULL,
    step TEXT NOT NULL,
    compensation INTEGER NOT NULL,
    operation TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at REAL NOT NULL,
    pid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_effects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL,
    saga_id TEXT NOT NULL,
    order_id TEXT NOT NULL,
    step TEXT NOT NULL,
    compensation INTEGER NOT NULL,
    operation TEXT NOT NULL,
    ok INTEGER NOT NULL,
    result TEXT,
    error TEXT,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_effects_key ON ledger_effects (idempotency_key)
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What a service call did: ``result`` when ``ok``, else the business ``error``."""

    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerReport:
    """The ledger's verdict on a finished run.

    Attributes:
        calls: service calls recorded (actions and compensations, every attempt).
        reruns: step bodies run again with the same (idempotency key, attempt): at-least-once
            execution after a crash, harmless because the service deduplicated them.
        applied_twice: (order, operation, count) for every effect applied more than once.
        committed_reruns: calls that started after sagakit's journal recorded that step's
            outcome (completed or failed) or that compensation's completion.
        unbalanced: sagas whose effects do not match their final state (a failed saga with an
            effect left uncompensated, a completed saga missing an effect, ...).
    """

    calls: int
    reruns: int
    applied_twice: list[tuple[str, str, int]]
    committed_reruns: int
    unbalanced: list[str]


# The journal entries that commit an outcome, and whether they belong to a compensation.
_OUTCOMES = {
    Kind.STEP_COMPLETED: False,
    Kind.STEP_FAILED: False,
    Kind.COMPENSATION_COMPLETED: True,
}
_BUSY_TIMEOUT_MS = 30_000


class Ledger:
    """The services' database, one SQLite file that many worker processes may share.

    Args:
        path: the ledger's SQLite file (created on first use).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._ready = False
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # A connection per call: calls come from many threads, and processes get SIGKILLed.
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
        try:
            # Other processes write too: wait for their locks instead of failing at once.
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous = NORMAL")  # survives a killed process
            if not self._ready:
                with self._lock:
                    conn.execute("PRAGMA journal_mode = WAL")
                    conn.executescript(_SCHEMA)
                    self._ready = True
            yield conn
        finally:
            conn.close()

    def setup(self) -> None:
        """Create the ledger file and its tables if they do not exist yet."""
        with self._connect():
            pass

    def record_call(
        self, ctx: StepContext, *, order_id: str, operation: str, compensation: bool
    ) -> None:
        """Record that a service received a call (before it does anything), and when."""
        at = time.time()
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO ledger_calls (idempotency_key, saga_id, order_id, step, compensation,"
                " operation, attempt, at, pid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ctx.idempotency_key, ctx.saga_id, order_id, ctx.step, compensation, operation,
                 ctx.attempt, at, os.getpid()),
            )  # fmt: skip

    def calls(self) -> list[Call]:
        """Every recorded call, in the order they were recorded."""
        with self._connect() as conn:
            found = conn.execute(
                "SELECT saga_id, step, compensation, operation, attempt, at, pid"
                " FROM ledger_calls ORDER BY id"
            ).fetchall()
        return [
            Call(saga_id=s, step=st, compensation=bool(c), operation=o, attempt=a, at=at, pid=p)
            for s, st, c, o, a, at, p in found
        ]

    def apply_once(
        self,
        ctx: StepContext,
        *,
        order_id: str,
        operation: str,
        compensation: bool,
        decide: Callable[[], Outcome],
    ) -> Outcome:
        """Apply ``decide()``'s outcome unless this idempotency key already has one; return
        the stored outcome either way. Failed outcomes are stored too, so a re-run of a
        declined payment is declined again."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT ok, result, error FROM ledger_effects WHERE idempotency_key = ?",
                    (ctx.idempotency_key,),
                ).fetchone()
                if row is not None:
                    conn.execute("COMMIT")
                    return Outcome(ok=bool(row[0]), result=_loads(row[1]), error=row[2])
                outcome = decide()
                conn.execute(
                    "INSERT INTO ledger_effects (idempotency_key, saga_id, order_id, step,"
                    " compensation, operation, ok, result, error, at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (ctx.idempotency_key, ctx.saga_id, order_id, ctx.step, compensation,
                     operation, outcome.ok, _dumps(outcome.result), outcome.error, time.time()),
                )  # fmt: skip
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return outcome

    def check(
        self,
        states: Mapping[str, SagaState],
        steps: Sequence[str],
        journals: Mapping[str, Sequence[Entry]],
    ) -> LedgerReport:
        """Check the ledger against the final saga states (saga id -> state) and journals
        (saga id -> entries, as ``App.journal`` returns them).

        ``steps`` are the saga's step names, every one of which has a compensation: a
        completed saga must have all their effects and no compensation; a failed saga must
        have a compensation for every effect it applied. No call may have started after the
        journal recorded its outcome.
        """
        with self._connect() as conn:
            calls = conn.execute("SELECT count(*) FROM ledger_calls").fetchone()[0]
            reruns = conn.execute(
                "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM ledger_calls"
                " WHERE compensation = 0 GROUP BY idempotency_key, attempt)"
            ).fetchone()[0]
            twice = conn.execute(
                "SELECT order_id, operation, count(*) FROM ledger_effects WHERE ok = 1"
                " GROUP BY order_id, operation HAVING count(*) > 1 ORDER BY order_id"
            ).fetchall()
            applied = conn.execute(
                "SELECT saga_id, step, compensation FROM ledger_effects WHERE ok = 1"
            ).fetchall()
        return LedgerReport(
            calls=calls,
            reruns=reruns,
            applied_twice=[(o, op, n) for o, op, n in twice],
            committed_reruns=len(committed_reruns(self.calls(), journals)),
            unbalanced=_unbalanced(states, steps, applied),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """A service call as the ledger recorded it: ``at`` is when it started, ``pid`` which
    process made it."""

    saga_id: str
    step: str
    compensation: bool
    operation: str
    attempt: int
    at: float
    pid: int


def committed_reruns(calls: Sequence[Call], journals: Mapping[str, Sequence[Entry]]) -> list[Call]:
    """The calls that started after the journal had recorded their outcome: the first
    ``step_completed``/``step_failed`` of their step, or ``compensation_completed`` of their
    compensation. Journal and ledger times come from the same machine's clock."""
    outcome_at: dict[tuple[str, str, bool], float] = {}
    for saga_id, entries in journals.items():
        for e in entries:
            compensation = _OUTCOMES.get(e.kind)
            if compensation is None or e.step is None:
                continue
            key = (saga_id, e.step, compensation)
            outcome_at[key] = min(e.at, outcome_at.get(key, e.at))
    never = float("inf")
    return [c for c in calls if c.at > outcome_at.get((c.saga_id, c.step, c.compensation), never)]


def _unbalanced(
    states: Mapping[str, SagaState], steps: Sequence[str], applied: list[tuple[str, str, int]]
) -> list[str]:
    done: dict[str, set[str]] = {}
    undone: dict[str, set[str]] = {}
    for saga_id, step, compensation in applied:
        (undone if compensation else done).setdefault(saga_id, set()).add(step)
    problems = []
    for saga_id in sorted(set(done) | set(undone) | set(states)):
        did, undid = done.get(saga_id, set()), undone.get(saga_id, set())
        state = states.get(saga_id)
        if undid - did:
            problems.append(f"{saga_id}: compensated {sorted(undid - did)} without the effect")
        if state is SagaState.COMPLETED and (did != set(steps) or undid):
            problems.append(f"{saga_id}: completed with effects {sorted(did)}, undone {undid}")
        elif state is SagaState.FAILED and did - undid:
            problems.append(f"{saga_id}: failed with {sorted(did - undid)} not compensated")
        elif state is None:
            problems.append(f"{saga_id}: effects for a saga sagakit does not know")
    return problems


def _dumps(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value)


def _loads(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value: dict[str, Any] = json.loads(text)
    return value
