"""The SQL of suspended sagas on SQLite (timers, signals, children) and of the outbox. Run on
the store's writer or reader thread with its connection."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Final

from sagakit.errors import FencedOut, InvalidSagaState, SagaNotFound
from sagakit.store import rows
from sagakit.store.base import CANCEL_SIGNAL, OutboxMessage, Signal

_ACTIVE: Final = "state IN ('started', 'running', 'compensating')"
_TERMINAL: Final = ("completed", "failed", "cancelled")


def suspend(
    conn: sqlite3.Connection,
    saga_id: str,
    *,
    owner: str | None,
    wake_at: float,
    signals: Mapping[str, int],
    children: Sequence[str],
) -> None:
    if owner is None:
        cur = conn.execute("UPDATE sagakit_sagas SET wake_at = ? WHERE id = ?", (wake_at, saga_id))
    else:
        cur = conn.execute(
            "UPDATE sagakit_sagas SET owner = NULL, wake_at = ? WHERE id = ? AND owner = ?",
            (wake_at, saga_id, owner),
        )
    if cur.rowcount == 0:
        raise FencedOut(saga_id, owner or "-")
    if _woken(conn, saga_id, signals, children):
        conn.execute("UPDATE sagakit_sagas SET wake_at = NULL WHERE id = ?", (saga_id,))


def wake(conn: sqlite3.Connection, saga_id: str) -> None:
    conn.execute(
        "UPDATE sagakit_sagas SET wake_at = NULL WHERE id = ? AND wake_at IS NOT NULL", (saga_id,)
    )


def next_wake(conn: sqlite3.Connection) -> float | None:
    row = conn.execute(
        f"SELECT min(wake_at) FROM sagakit_sagas WHERE wake_at IS NOT NULL AND {_ACTIVE}"
    ).fetchone()
    return None if row[0] is None else float(row[0])


def send_signal(
    conn: sqlite3.Connection,
    saga_id: str,
    *,
    signal_id: str,
    name: str,
    payload: str | None,
    at: float,
) -> bool:
    found = conn.execute("SELECT state FROM sagakit_sagas WHERE id = ?", (saga_id,)).fetchone()
    if found is None:
        raise SagaNotFound(saga_id)
    if found[0] in _TERMINAL:
        raise InvalidSagaState(saga_id, found[0], f"signal {name!r} to", "not finished")
    cur = conn.execute(
        "INSERT INTO sagakit_signals (saga_id, signal_id, name, payload, at) "
        "VALUES (?,?,?,?,?) ON CONFLICT (saga_id, signal_id) DO NOTHING",
        (saga_id, signal_id, name, payload, at),
    )
    if cur.rowcount == 0:
        return False
    conn.execute("UPDATE sagakit_sagas SET wake_at = NULL WHERE id = ?", (saga_id,))
    return True


def signals(conn: sqlite3.Connection, saga_id: str, name: str | None = None) -> list[Signal]:
    query = f"SELECT {rows.SIGNAL_COLUMNS} FROM sagakit_signals WHERE saga_id = ?"
    if name is None:
        found = conn.execute(f"{query} ORDER BY id", (saga_id,))
    else:
        found = conn.execute(f"{query} AND name = ? ORDER BY id", (saga_id, name))
    return [rows.signal(r) for r in found]


def cancel_requests(conn: sqlite3.Connection, after: int) -> list[Signal]:
    cols = ", ".join(f"g.{c}" for c in rows.SIGNAL_COLUMNS.split(", "))
    found = conn.execute(
        f"SELECT {cols} FROM sagakit_signals g JOIN sagakit_sagas s ON s.id = g.saga_id "
        f"WHERE g.name = ? AND g.id > ? AND s.{_ACTIVE} ORDER BY g.id",
        (CANCEL_SIGNAL, after),
    )
    return [rows.signal(r) for r in found]


def _woken(
    conn: sqlite3.Connection, saga_id: str, signals: Mapping[str, int], children: Sequence[str]
) -> bool:
    """Whether a suspended saga has something to go on with already: a signal it waits for
    beyond those it consumed, or a child that ended (one that needs attention does not wake
    its parent: it waits for an operator, and the parent's periodic recheck sees the end)."""
    for name, consumed in signals.items():
        row = conn.execute(
            "SELECT count(*) FROM sagakit_signals WHERE saga_id = ? AND name = ?", (saga_id, name)
        ).fetchone()
        if row[0] > consumed:
            return True
    if children:
        marks = ",".join("?" * len(children))
        row = conn.execute(
            f"SELECT 1 FROM sagakit_sagas WHERE id IN ({marks}) AND state IN (?,?,?) LIMIT 1",
            [*children, *_TERMINAL],
        ).fetchone()
        return row is not None
    return False


_OUTBOX_COLUMNS: Final = "id, saga_id, message_id, topic, message, created_at, attempts"


def outbox_claim(
    conn: sqlite3.Connection, limit: int, lease: float, now: float
) -> list[OutboxMessage]:
    found = conn.execute(
        "UPDATE sagakit_outbox SET available_at = ?, attempts = attempts + 1 WHERE id IN "
        "(SELECT id FROM sagakit_outbox WHERE available_at <= ? ORDER BY id LIMIT ?) "
        f"RETURNING {_OUTBOX_COLUMNS}",
        (now + lease, now, limit),
    ).fetchall()
    return sorted((_outbox(r) for r in found), key=lambda m: m.id)


def outbox_done(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    conn.executemany("DELETE FROM sagakit_outbox WHERE id = ?", [(i,) for i in ids])


def outbox_stats(conn: sqlite3.Connection) -> tuple[int, float | None]:
    row = conn.execute("SELECT count(*), min(created_at) FROM sagakit_outbox").fetchone()
    return int(row[0]), None if row[1] is None else float(row[1])


def _outbox(row: Sequence[object]) -> OutboxMessage:
    return OutboxMessage(
        id=int(row[0]),  # type: ignore[call-overload]
        saga_id=str(row[1]),
        message_id=str(row[2]),
        topic=str(row[3]),
        message=str(row[4]),
        created_at=float(row[5]),  # type: ignore[arg-type]
        attempts=int(row[6]),  # type: ignore[call-overload]
    )
