"""The approval example's budget service (a SQLite file of its own) under concurrent first use.

A worker runs the example's step bodies in a thread pool, so the first requests it takes all
open the fresh budget file at once, and each runs ``Budget._setup``, which switches the file
to WAL. Switching a file to WAL is a write in the rollback journal; while one connection makes
it, another connection's ``PRAGMA journal_mode = WAL`` fails at once with "database is locked"
(the busy timeout does not apply to it). ``reserve_budget`` has no retry policy, so the
purchase request fails for it, compensated, as if it had been turned down.
"""

from __future__ import annotations

import sqlite3
import threading
from decimal import Decimal
from pathlib import Path

from sagakit import StepContext
from sagakit.examples.approval import Budget, sample_request


def step_context(n: int) -> StepContext:
    saga_id = f"saga-{n}"
    return StepContext(saga_id=saga_id, saga_type="PurchaseApproval", step="reserve_budget",
                       attempt=1, idempotency_key=f"{saga_id}/reserve_budget",
                       results={})  # fmt: skip


def test_a_budget_hold_on_a_file_set_up_before_waits_for_a_writer(tmp_path: Path) -> None:
    """The control: once the file is in WAL mode, a hold waits for another writer."""
    path = tmp_path / "budget.db"
    budget = Budget(path)
    assert budget.held("PR-0000") == 0  # sets the file up
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    done = threading.Timer(0.2, other.execute, ("COMMIT",))
    done.start()
    try:
        Budget(path).hold(step_context(1), sample_request(1))
    finally:
        done.join()
        other.close()
    assert budget.held("PR-0001") == Decimal("1250.00")


def test_a_budget_hold_on_a_fresh_file_waits_for_a_concurrent_first_use(tmp_path: Path) -> None:
    """A hold on a fresh file while another connection holds the write lock in the rollback
    journal (as another thread's ``_setup`` does while it switches the file to WAL, and as
    seen in test_waits_crash.py: a request failed "OperationalError: database is locked" 50 ms
    into reserve_budget) must wait for it, as any other write does, then succeed."""
    path = tmp_path / "budget.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    done = threading.Timer(0.2, other.execute, ("COMMIT",))
    done.start()
    try:
        Budget(path).hold(step_context(1), sample_request(1))
    finally:
        done.join()
        other.close()
    assert Budget(path).held("PR-0001") == Decimal("1250.00")
