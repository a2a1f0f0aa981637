"""Explore's clock: real time, plus the time skipped while nothing but sleepers is left.

A retry back-off, a compensation's back-off and a durable timer would make each failure point
wait in real time (a compensation that always fails waits through five back-offs). Explore
runs every point on a :class:`SkipClock`: it reads the real time plus an offset, and when the
run has no step body in flight, the driver moves the offset forward to the next sleeper. A step
body that runs meanwhile is timed in real time, so its timeout keeps its meaning.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time


class SkipClock:
    """A :class:`~sagakit.clock.Clock` that follows real time and can skip ahead.

    Args:
        start: what :meth:`now` returns at first (seconds since the epoch).
    """

    def __init__(self, start: float | None = None) -> None:
        self._offset = 0.0 if start is None else start - time.time()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return time.time() + self._offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now() + seconds, next(self._order), future))
        await future

    @property
    def next_due(self) -> float | None:
        """When the earliest sleeper wakes, or None if nothing sleeps."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)  # cancelled: its sleep was abandoned
        return self._sleepers[0][0] if self._sleepers else None

    def wake_due(self) -> None:
        """Wake every sleeper whose time has come."""
        now = self.now()
        while self._sleepers and self._sleepers[0][0] <= now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    def skip_to(self, when: float) -> None:
        """Move the time forward to ``when`` (never back) and wake who is due by then."""
        now = self.now()
        if when > now:
            self._offset += when - now
        self.wake_due()

    def skip_to_next(self) -> bool:
        """Skip to the earliest sleeper, if any; return whether one was woken."""
        due = self.next_due
        if due is None:
            return False
        self.skip_to(due)
        return True
