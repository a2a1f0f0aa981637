"""Purchase approval: a saga that waits days for a person, durably.

A purchase request reserves budget, asks the approvers, and waits up to ``approval_days`` for
an ``approve`` or ``reject`` signal. Approved: the purchase order goes to the vendor (the pivot:
past it nothing is undone) and the requester is told (retried until it succeeds). Rejected, or
no answer in time: the budget hold is released and the saga ends ``failed``. While it waits,
the saga is not in memory; a worker restart changes nothing.

The budget service keeps its holds in a SQLite file of its own, keyed by the idempotency key
sagakit passes each step, so a step re-run after a crash holds the budget once.

Run it::

    python examples/approval.py          # starts a request and prints how to answer it
    sagakit worker --app sagakit.examples.approval:app
    sagakit signal <saga id> approve '{"by": "ann"}'
    sagakit signal <saga id> reject '{"by": "bob", "comment": "too expensive"}'

``SAGAKIT_APPROVAL_DB`` names sagakit's database (default ``sqlite:///approvals.db``) and
``SAGAKIT_APPROVAL_BUDGET`` the budget file (default: next to a SQLite database).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sagakit import (
    App,
    ConfigurationError,
    RetryPolicy,
    SignalTimedOut,
    StepContext,
    WorkflowContext,
)
from sagakit.store import SqliteStore

SAGA_TYPE = "PurchaseApproval"


@dataclass(frozen=True, slots=True, kw_only=True)
class PurchaseRequest:
    """The saga's input."""

    request_id: str
    requester: str
    amount: Decimal
    description: str
    cost_center: str = "CC-100"
    approvers: list[str] = field(default_factory=lambda: ["ann", "bob"])


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The payload of an ``approve`` or ``reject`` signal."""

    by: str
    comment: str = ""


class Rejected(Exception):
    """An approver said no: a business outcome, the budget is released."""


class ApprovalExpired(Exception):
    """Nobody answered in time: the budget is released."""


class Budget:
    """The budget service: holds on a cost centre, one per idempotency key."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._ready = False  # the file is created on first use, not on import
        self._setup_lock = threading.Lock()

    def _setup(self, db: sqlite3.Connection) -> None:
        # Switching a fresh file to WAL fails at once (no busy wait) while another connection,
        # of this process or another, is setting it up too: retry for a while.
        for _ in range(200):
            try:
                db.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc):
                    raise
                time.sleep(0.05)
        db.execute(
            "CREATE TABLE IF NOT EXISTS holds (key TEXT PRIMARY KEY, request_id TEXT NOT NULL, "
            "cost_center TEXT NOT NULL, amount TEXT NOT NULL, released INTEGER NOT NULL)"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS orders (key TEXT PRIMARY KEY, request_id TEXT NOT NULL, "
            "po TEXT NOT NULL)"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS messages (key TEXT PRIMARY KEY, request_id TEXT NOT NULL, "
            "text TEXT NOT NULL)"
        )

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            if not self._ready:
                with self._setup_lock:
                    if not self._ready:
                        self._setup(db)
                        self._ready = True
            yield db
        finally:
            db.close()

    def hold(self, ctx: StepContext, req: PurchaseRequest) -> str:
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO holds VALUES (?, ?, ?, ?, 0)",
                (ctx.idempotency_key, req.request_id, req.cost_center, str(req.amount)),
            )
        return ctx.idempotency_key

    def release(self, ctx: StepContext, req: PurchaseRequest, hold: str) -> None:
        with self._db() as db:
            db.execute("UPDATE holds SET released = 1 WHERE key = ?", (hold,))

    def place_order(self, ctx: StepContext, req: PurchaseRequest) -> str:
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO orders VALUES (?, ?, ?)",
                (ctx.idempotency_key, req.request_id, f"PO-{uuid.uuid4().hex[:8].upper()}"),
            )
            row = db.execute("SELECT po FROM orders WHERE key = ?", (ctx.idempotency_key,))
            return str(row.fetchone()[0])

    def tell(self, ctx: StepContext, message: dict[str, str]) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO messages VALUES (?, ?, ?)",
                (ctx.idempotency_key, message["request_id"], message["text"]),
            )

    def held(self, request_id: str) -> Decimal:
        """The budget still held for a request."""
        with self._db() as db:
            rows = db.execute(
                "SELECT amount FROM holds WHERE request_id = ? AND released = 0", (request_id,)
            )
            return sum((Decimal(r[0]) for r in rows), Decimal(0))

    def orders(self, request_id: str) -> list[str]:
        with self._db() as db:
            rows = db.execute("SELECT po FROM orders WHERE request_id = ?", (request_id,))
            return [r[0] for r in rows]


def approval_workflow(budget: Budget, approval_days: float) -> Any:
    """The workflow, closing over the budget service and the time approvers get."""

    def notify_approvers(ctx: StepContext, req: PurchaseRequest) -> list[str]:
        text = f"{req.requester} asks {req.amount} for {req.description!r}; reply by signal"
        budget.tell(ctx, {"request_id": req.request_id, "text": text})
        return list(req.approvers)

    async def purchase_approval(ctx: WorkflowContext, req: PurchaseRequest) -> dict[str, Any]:
        hold = await ctx.step(budget.hold, req, name="reserve_budget", compensate=budget.release)
        await ctx.step(notify_approvers, req)
        try:
            answer, decision = await ctx.wait_for_any_signal(
                "approve", "reject", timeout=timedelta(days=approval_days), type=Decision
            )
        except SignalTimedOut:
            raise ApprovalExpired(f"no decision within {approval_days} days") from None
        if answer == "reject":
            raise Rejected(f"rejected by {decision.by}: {decision.comment or 'no comment'}")
        po = await ctx.step(budget.place_order, req, name="place_purchase_order", pivot=True)
        text = f"request {req.request_id} approved by {decision.by}: {po}"
        await ctx.step(
            budget.tell,
            {"request_id": req.request_id, "text": text},
            name="notify_requester",
            retriable=True,
            retry=RetryPolicy(initial_interval=1.0, max_interval=300.0),
        )
        return {"hold": hold, "purchase_order": po, "approved_by": decision.by}

    return purchase_approval


def create_app(
    url: str | None = None,
    *,
    budget_path: str | os.PathLike[str] | None = None,
    approval_days: float = 3.0,
    **app_options: Any,
) -> App:
    """An App with the PurchaseApproval saga registered (extra keywords go to :class:`App`)."""
    if approval_days <= 0:
        raise ConfigurationError(f"approval_days must be > 0, got {approval_days}")
    app = App(url or "sqlite:///approvals.db", **app_options)
    if budget_path is None:
        store = app.store
        folder = Path(store.path).parent if isinstance(store, SqliteStore) else Path.cwd()
        budget_path = folder / "approvals-budget.db"
    budget = Budget(budget_path)
    app.saga(SAGA_TYPE)(approval_workflow(budget, approval_days))
    app.budget = budget  # type: ignore[attr-defined]  # for scripts and tests to inspect
    return app


def budget_of(app: App) -> Budget:
    """The budget service of an App made by :func:`create_app`."""
    budget: Budget = app.budget  # type: ignore[attr-defined]
    return budget


def sample_request(n: int, amount: str = "1250.00") -> PurchaseRequest:
    return PurchaseRequest(
        request_id=f"PR-{n:04d}",
        requester="carol",
        amount=Decimal(amount),
        description="a laptop for the new hire",
    )


# `sagakit worker --app sagakit.examples.approval:app` and `sagakit graph --app ...` use this.
app = create_app(
    os.environ.get("SAGAKIT_APPROVAL_DB"),
    budget_path=os.environ.get("SAGAKIT_APPROVAL_BUDGET"),
)
