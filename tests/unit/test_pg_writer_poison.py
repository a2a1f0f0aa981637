"""The PostgreSQL group-commit writer never commits a saga's entry after an earlier queued
entry of that saga failed (a hole in the journal), even when the later one was queued while
the failing batch was in flight. A fake statement runner: no database."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from sagakit.errors import StoreUnavailable
from sagakit.journal import Entry, Kind
from sagakit.store.postgres_writer import Op, PgWriter


def entry(index: int) -> Entry:
    return Entry(saga_id="s", index=index, kind=Kind.STEP_STARTED, at=1.0, seq=index, step="a")


async def test_an_entry_queued_during_a_failing_batch_is_refused_too() -> None:
    written: list[list[int]] = []
    in_flight = asyncio.Event()
    release = asyncio.Event()
    calls = 0

    async def execute(statement: str, args: Sequence[Any]) -> list[Any]:
        nonlocal calls
        calls += 1
        indexes = list(args[1])  # the idx column of the appended entries
        if calls == 1:
            in_flight.set()
            await release.wait()
            raise StoreUnavailable("db", "connection terminated")
        written.append(indexes)
        return [("s",)]

    writer = PgWriter(execute, lambda: "w")
    writer.lazy_delay = 0.0
    writer.start()
    writer.submit(Op("s", (entry(1),), None))  # lazy: nobody hears its failure at once
    await in_flight.wait()
    writer.submit(Op("s", (entry(2),), None))  # queued while entry 1's batch is in flight
    release.set()
    durable: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    await asyncio.sleep(0.05)
    writer.submit(Op("s", (entry(3),), durable))
    with pytest.raises(StoreUnavailable):
        await durable  # the saga's next durable write reports the failure
    after: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    writer.submit(Op("s", (entry(1),), after))  # a new run, from the journal: goes through
    await after
    await writer.stop()
    assert written == [[1]], "entry 2 or 3 was committed after the hole left by entry 1"
