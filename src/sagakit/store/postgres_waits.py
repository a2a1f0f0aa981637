"""Suspended sagas on PostgreSQL: durable timers, signals and child sagas.

Timers are judged by the database's clock, the one clock all workers share: a claim takes a
suspended saga once its ``wake_at`` is at most ``clock_timestamp()``. Workers learn that clock
through :class:`ClockReading`, an offset from their own monotonic clock measured with a round
trip (and refreshed by the heartbeat), with bounds wide enough to hold the truth.

Races between a saga going to sleep and the events that should wake it are settled by the row
lock of the saga: :meth:`PgWaits.suspend` holds it from its first statement to its commit,
and looks for what already arrived in a later statement (READ COMMITTED: a fresh snapshot);
:meth:`PgWaits.send_signal` stores the signal before it takes the row lock, and
:meth:`PgWaits.wake` takes the lock without a condition. So whichever commits second sees the
other, and no saga sleeps with a signal or an ended child waiting for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sagakit.errors import FencedOut, InvalidSagaState, SagaNotFound, StoreError
from sagakit.store import postgres_sql as sql
from sagakit.store import rows
from sagakit.store.base import CANCEL_SIGNAL, Signal
from sagakit.store.postgres_errors import translate
from sagakit.store.postgres_writer import PgWriter

if TYPE_CHECKING:
    import asyncpg

# How fast the local monotonic clock may drift from the database's between two readings:
# 500 ppm is the most that NTP ever slews a clock, far more than a quartz clock drifts.
MAX_DRIFT: Final = 500e-6
# Beyond half the round trip: the resolution of clock_timestamp() and of a float8 epoch.
READ_MARGIN: Final = 1e-3
# A saga suspended until sooner than this many seconds from now is announced (NOTIFY), so
# that workers sleeping until their next poll plan for it in time.
NOTIFY_WITHIN: Final = 1.0

_TERMINAL: Final = ("completed", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class ClockReading:
    """The database's clock as ``time.monotonic() + offset``, within ``error`` seconds when
    read at ``taken`` (monotonic seconds). The monotonic clock, unlike ``time.time()``,
    never jumps when this host's clock is set."""

    offset: float
    error: float
    taken: float

    def bounds(self) -> tuple[float, float]:
        now = time.monotonic()
        slack = self.error + MAX_DRIFT * max(0.0, now - self.taken)
        return now + self.offset - slack, now + self.offset + slack


async def read_clock(conn: asyncpg.Connection, tries: int = 1) -> ClockReading:
    """Read the database's clock ``tries`` times; keep the reading of the fastest round
    trip, the tightest."""
    best: ClockReading | None = None
    for _ in range(tries):
        before = time.monotonic()
        db_now = await conn.fetchval(sql.CLOCK)
        after = time.monotonic()
        middle = (before + after) / 2
        reading = ClockReading(db_now - middle, (after - before) / 2 + READ_MARGIN, middle)
        if best is None or reading.error < best.error:
            best = reading
    assert best is not None
    return best


class PgWaits:
    """The store methods of suspended sagas, on the pool, writer and owner of a
    :class:`~sagakit.store.postgres.PostgresStore`."""

    def __init__(
        self,
        location: str,
        channel: str,
        pool: Callable[[], asyncpg.Pool],
        owner: Callable[[], str | None],
        writer: PgWriter,
    ) -> None:
        self._location = location
        self._channel = channel
        self._pool = pool
        self._owner = owner
        self._writer = writer
        self.clock: ClockReading | None = None

    def clock_bounds(self) -> tuple[float, float]:
        if self.clock is None:
            raise StoreError("the store is not open; use `async with App(...)` or await app.open()")
        return self.clock.bounds()

    async def suspend(
        self, saga_id: str, wake_at: float, signals: Mapping[str, int], children: Sequence[str]
    ) -> None:
        pool = self._pool()
        await self._writer.drain(saga_id)  # the saga's queued entries commit first
        owner = self._owner()
        names = list(signals)
        async with translate(self._location), pool.acquire() as conn, conn.transaction():
            if owner is None:
                due_in = await conn.fetchval(sql.SUSPEND_UNFENCED, saga_id, wake_at)
            else:
                due_in = await conn.fetchval(sql.SUSPEND, saga_id, wake_at, owner)
            if due_in is None:
                raise FencedOut(saga_id, owner or "-")
            woken = await conn.fetchval(
                sql.WAKE_IF_READY, saga_id, names, [signals[n] for n in names], list(children)
            )
            if woken is not None or due_in <= NOTIFY_WITHIN:
                await conn.execute(sql.NOTIFY, self._channel)

    async def wake(self, saga_id: str) -> None:
        async with translate(self._location), self._pool().acquire() as conn, conn.transaction():
            if await conn.fetchval(sql.WAKE, saga_id) is not None:
                await conn.execute(sql.NOTIFY, self._channel)

    async def next_wake(self) -> float | None:
        async with translate(self._location):
            found = await self._pool().fetchval(sql.NEXT_WAKE)
        return None if found is None else float(found)

    async def send_signal(
        self, saga_id: str, signal_id: str, name: str, payload: str | None, at: float
    ) -> bool:
        pool = self._pool()
        async with translate(self._location), pool.acquire() as conn, conn.transaction():
            found = await conn.fetchrow(
                sql.SEND_SIGNAL, saga_id, signal_id, name, payload, self._channel
            )
            assert found is not None  # the statement always returns its one row
            self._check_open(saga_id, name, found["before"])
            if found["stored"] is None:
                return False
            # The saga may have ended while this waited for its row: raising rolls back.
            self._check_open(saga_id, name, found["after"])
        return True

    @staticmethod
    def _check_open(saga_id: str, name: str, state: str | None) -> None:
        if state is None:
            raise SagaNotFound(saga_id)
        if state in _TERMINAL:
            raise InvalidSagaState(saga_id, state, f"signal {name!r} to", "not finished")

    async def signals(self, saga_id: str, name: str | None = None) -> list[Signal]:
        async with translate(self._location):
            if name is None:
                found = await self._pool().fetch(sql.SIGNALS, saga_id)
            else:
                found = await self._pool().fetch(sql.SIGNALS_NAMED, saga_id, name)
        return [rows.signal(r) for r in found]

    async def cancel_requests(self, after: int) -> list[Signal]:
        async with translate(self._location):
            found = await self._pool().fetch(sql.CANCEL_REQUESTS, CANCEL_SIGNAL, after)
        return [rows.signal(r) for r in found]
