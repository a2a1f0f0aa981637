"""Time as the engine sees it: the system clock, or a virtual one that tests move by hand.

Everything in sagakit that waits or reads the time for a saga (durable timers, signal
timeouts, step timeouts, retry back-off, deadlines, the worker's wake-ups) goes through a
:class:`Clock`, so a test of a three-day approval can skip the three days.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real time: :func:`time.time` and :func:`asyncio.sleep`."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


SYSTEM_CLOCK = SystemClock()


class VirtualClock:
    """A clock that stands still until :meth:`advance` moves it.

    Give it to an App (``App(url, clock=clock)``, SQLite only) and a saga's timers, signal
    timeouts, step timeouts and retry back-offs wait for virtual time: ``await
    clock.advance(timedelta(days=3))`` fires what falls due in those three days, in order,
    in milliseconds of real time.

    Args:
        start: the initial time (seconds since the epoch or an aware datetime); default now.
    """

    def __init__(self, start: float | datetime | None = None) -> None:
        if isinstance(start, datetime):
            start = start.timestamp()
        self._now = time.time() if start is None else float(start)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), future))
        await future

    @property
    def next_due(self) -> float | None:
        """When the earliest sleeper wakes, or None if nothing sleeps."""
        self._drop_cancelled()
        return self._sleepers[0][0] if self._sleepers else None

    def _drop_cancelled(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)

    async def advance(self, by: float | timedelta, *, settle: float = 0.05) -> None:
        """Move the clock forward, waking every sleeper that falls due on the way, in order;
        after each wake-up, real time ``settle`` (seconds) lets the woken work go on (and
        maybe sleep again, within the span) before the clock moves further."""
        seconds = by.total_seconds() if isinstance(by, timedelta) else float(by)
        if seconds < 0:
            raise ValueError(f"a clock cannot go back; advance() got {seconds} s")
        target = self._now + seconds
        while True:
            due = self.next_due
            if due is None or due > target:
                break
            self._now = max(self._now, due)
            while self._sleepers and self._sleepers[0][0] <= self._now:
                _, _, future = heapq.heappop(self._sleepers)
                if not future.done():
                    future.set_result(None)
            await asyncio.sleep(settle)
        self._now = target
        await asyncio.sleep(settle)
