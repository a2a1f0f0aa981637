"""The Store contract of suspended sagas (timers, signals, children), on SQLite and PostgreSQL.

Written once over ``any_url`` like test_store_contract.py, whose helpers it shares; what
depends on the clock that judges timers is tested per backend at the end: SQLite's is the
store's clock (a VirtualClock here), PostgreSQL's is the database server's, and races with
other transactions exist on PostgreSQL only.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_store_contract import (
    OTHER_WORKER,
    Journal,
    Stores,
    eventually,
    first_entry,
    k,
    make_record,
    move_to,
    new_saga,
    pg_conn,
)

from sagakit.clock import VirtualClock
from sagakit.errors import FencedOut, InvalidSagaState, SagaNotFound, StoreError
from sagakit.journal import Kind, SagaState
from sagakit.store import SqliteStore
from sagakit.store.base import CANCEL_SIGNAL, WAIT_FOREVER, SagaRecord, Store, TypeCap

ERR_FAIL = {"type": "RuntimeError", "module": "builtins", "message": "card declined"}
LATER = time.time() + 3600  # a wake time no test reaches


@pytest.fixture
async def stores(any_url: str) -> AsyncIterator[Stores]:
    s = Stores(any_url)
    try:
        yield s
    finally:
        await s.close_all()


@pytest.fixture
async def pg_stores(pg_url: str) -> AsyncIterator[Stores]:
    s = Stores(pg_url)
    try:
        yield s
    finally:
        await s.close_all()


async def row(store: Store, saga_id: str) -> SagaRecord:
    found = await store.get(saga_id)
    assert found is not None
    return found


async def asleep(store: Store, owner: str | None = None, **kwargs: Any) -> SagaRecord:
    """A saga that ``store`` (a worker) owned and suspended until LATER."""
    r = await new_saga(store, owner=store.worker_id, **kwargs)
    await store.suspend(r.id, LATER, {}, [])
    return await row(store, r.id)


async def claim_one(store: Store, saga_id: str) -> None:
    """Claim, and check that ``saga_id`` was among the sagas claimed."""
    assert saga_id in [c.record.id for c in await store.claim(100)]


async def send(store: Store, saga_id: str, signal_id: str, name: str = "approve") -> bool:
    return await store.send_signal(saga_id, signal_id, name, f'"{signal_id}"', time.time())


# -- the new columns ---------------------------------------------------------------------------


async def test_create_stores_parent_id_and_wake_at(stores: Stores) -> None:
    store = await stores.open()
    parent = await new_saga(store)
    assert (parent.parent_id, parent.wake_at) == (None, None)
    child = replace(make_record(), parent_id=parent.id, wake_at=LATER)
    stored, created = await store.create(child, first_entry(child))
    assert (stored, created) == (child, True)
    assert await store.get(child.id) == child
    assert [r for r in await store.list_sagas() if r.id == child.id] == [child]


# -- suspend and claim -------------------------------------------------------------------------


async def test_claim_skips_a_suspended_saga_until_it_is_due(stores: Stores) -> None:
    store = await stores.worker()
    sleeping = await new_saga(store, owner=store.worker_id)
    due = await new_saga(store, owner=store.worker_id)
    forever = await new_saga(store, owner=store.worker_id)
    await store.suspend(sleeping.id, LATER, {}, [])
    await store.suspend(due.id, time.time() - 1, {}, [])
    await store.suspend(forever.id, WAIT_FOREVER, {"approve": 0}, [])

    got = await row(store, sleeping.id)
    assert (got.owner, got.wake_at) == (None, LATER), "suspend releases the saga"
    assert (await row(store, forever.id)).wake_at == WAIT_FOREVER
    (c,) = await store.claim(10)
    assert c.record.id == due.id, "a saga whose wake time passed is claimed"
    assert c.record.owner == store.worker_id
    assert c.journal == [first_entry(due)]
    # No variant of claim takes a sleeping saga: capped, uncapped, suspects.
    assert await store.claim(10, {"Order": TypeCap(cluster=10, worker=10)}) == []
    assert await store.claim(10, suspects=True, suspect_after=0) == []
    assert await store.claim(10) == []


async def test_claim_takes_ready_sagas_oldest_first_then_due_ones_by_wake_time(
    stores: Stores,
) -> None:
    """The order the ready index gives: new or woken sagas by creation, then due waits by
    their wake time; none of many waiting sagas is claimed, and they do not crowd out a
    ready one (a claim of 2 gets the 2 first, not 2 of the waiting). A claim's rows come back
    in no particular order, so the order is seen one claim at a time."""
    store = await stores.worker()
    now = time.time()
    waiting = [await new_saga(store, owner=store.worker_id, created_at=now - 900 + n)
               for n in range(30)]  # fmt: skip
    for r in waiting:
        await store.suspend(r.id, LATER, {}, [])
    late_due = await new_saga(store, owner=store.worker_id, created_at=now - 800)
    early_due = await new_saga(store, owner=store.worker_id, created_at=now - 700)
    await store.suspend(late_due.id, now - 5, {}, [])
    await store.suspend(early_due.id, now - 50, {}, [])
    woken = await new_saga(store, owner=store.worker_id, created_at=now - 600)
    await store.suspend(woken.id, LATER, {}, [])
    await store.wake(woken.id)
    new = await new_saga(store, created_at=now - 500)

    first = [c.record.id for c in await store.claim(2)]
    rest = []
    for _ in range(2):
        (one,) = await store.claim(1)
        rest.append(one.record.id)
    names = {woken.id: "woken", new.id: "new", early_due.id: "early", late_due.id: "late"}
    assert {names.get(i, i) for i in first} == {"woken", "new"}
    assert [names.get(i, i) for i in rest] == ["early", "late"]
    assert await store.claim(10) == []
    assert [(await row(store, r.id)).wake_at for r in waiting] == [LATER] * len(waiting)


async def test_suspend_commits_after_the_queued_entries_of_the_saga(stores: Stores) -> None:
    store = await stores.worker()
    r = await new_saga(store, owner=store.worker_id)
    j = Journal(r)
    store.append_soon(r.id, j.batch(k(Kind.STEP_STARTED, seq=0, step="a", attempt=1)))
    store.append_soon(r.id, j.batch(k(Kind.STEP_COMPLETED, seq=0, step="a", attempt=1)))
    await store.suspend(r.id, LATER, {}, [])
    assert await store.journal(r.id) == j.entries
    got = await row(store, r.id)
    assert (got.state, got.owner, got.wake_at) == (SagaState.RUNNING, None, LATER)


async def test_suspend_is_fenced(stores: Stores) -> None:
    store = await stores.worker()
    theirs = await new_saga(store, owner=OTHER_WORKER)
    nobodys = await new_saga(store)
    for r in (theirs, nobodys):
        with pytest.raises(FencedOut) as raised:
            await store.suspend(r.id, LATER, {}, [])
        assert (raised.value.saga_id, raised.value.worker) == (r.id, store.worker_id)
        assert await store.get(r.id) == r, "a fenced suspend changes nothing"
    with pytest.raises(FencedOut):
        await store.suspend("no-such-saga", LATER, {}, [])

    # A queued entry that was fenced out fails the suspend behind it.
    store.append_soon(theirs.id, [Journal(theirs).new(Kind.STEP_STARTED, seq=0, step="a")])
    with pytest.raises(FencedOut):
        await store.suspend(theirs.id, LATER, {}, [])
    assert await store.get(theirs.id) == theirs

    # A store that is no worker suspends without a fence (and leaves the owner alone).
    operator = await stores.open()
    await operator.suspend(theirs.id, LATER, {}, [])
    got = await row(store, theirs.id)
    assert (got.owner, got.wake_at) == (OTHER_WORKER, LATER)


async def test_suspend_waiting_for_a_stored_signal_or_an_ended_child_wakes_at_once(
    stores: Stores,
) -> None:
    store = await stores.worker()
    r = await new_saga(store, owner=store.worker_id)
    assert await send(store, r.id, "s1")
    assert await send(store, r.id, "s2", name="other")

    # Every stored signal consumed, nothing else waited for: it sleeps.
    await store.suspend(r.id, WAIT_FOREVER, {"approve": 1, "other": 1, "never": 0}, [])
    assert (await row(store, r.id)).wake_at == WAIT_FOREVER
    assert await store.claim(10) == []
    await store.wake(r.id)
    await claim_one(store, r.id)

    # One "approve" stored beyond the one consumed: it does not sleep.
    assert await send(store, r.id, "s3")
    await store.suspend(r.id, WAIT_FOREVER, {"approve": 1}, [])
    assert (await row(store, r.id)).wake_at is None
    await claim_one(store, r.id)

    children = [await new_saga(store) for _ in range(3)]
    await move_to(store, children[1].id, Kind.STEP_STARTED, seq=0, step="a", attempt=1)
    await move_to(store, children[2].id, Kind.SAGA_PARKED, error=ERR_FAIL)
    await store.suspend(r.id, LATER, {}, [ch.id for ch in children])
    assert (await row(store, r.id)).wake_at == LATER, "no child ended (one waits for an operator)"
    await store.wake(r.id)
    for ending, fields in (
        (Kind.SAGA_COMPLETED, {"payload": "1"}),
        (Kind.SAGA_FAILED, {}),
        (Kind.SAGA_CANCELLED, {}),
    ):
        await claim_one(store, r.id)
        child = await new_saga(store)
        await move_to(store, child.id, ending, **fields)
        await store.suspend(r.id, LATER, {}, [children[0].id, child.id, "no-such-saga"])
        assert (await row(store, r.id)).wake_at is None, f"a child that ended ({ending})"


# -- signals -----------------------------------------------------------------------------------


async def test_send_signal_stores_once_per_signal_id_and_wakes_the_saga(stores: Stores) -> None:
    store = await stores.worker()
    r = await asleep(store)
    client = await stores.open()
    before = time.time()
    assert await client.send_signal(r.id, "sig-1", "approve", '{"ok": true}', before) is True
    assert (await row(store, r.id)).wake_at is None, "a signal wakes the saga"
    await claim_one(store, r.id)
    await store.suspend(r.id, LATER, {}, [])

    assert await client.send_signal(r.id, "sig-1", "approve", '"again"', time.time()) is False
    assert (await row(store, r.id)).wake_at == LATER, "a repeated signal wakes nobody"
    (s,) = await store.signals(r.id)
    assert (s.saga_id, s.signal_id, s.name, s.payload) == (r.id, "sig-1", "approve", '{"ok": true}')
    if isinstance(store, SqliteStore):
        assert s.at == before
    else:  # PostgreSQL times the arrival by its own clock, which judges wait timeouts
        _lower, upper = store.clock_bounds()
        assert before - 1 < s.at <= upper
    # The same signal id for another saga is another signal.
    other = await new_saga(store)
    assert await send(client, other.id, "sig-1")
    assert [x.signal_id for x in await store.signals(other.id)] == ["sig-1"]


async def test_send_signal_refuses_unknown_and_finished_sagas_and_writes_nothing(
    stores: Stores,
) -> None:
    store = await stores.open()
    with pytest.raises(SagaNotFound) as missing:
        await send(store, "no-such-saga", "s")
    assert missing.value.saga_id == "no-such-saga"
    assert await store.signals("no-such-saga") == []

    for ending, fields, state in (
        (Kind.SAGA_COMPLETED, {"payload": "1"}, "completed"),
        (Kind.SAGA_FAILED, {}, "failed"),
        (Kind.SAGA_CANCELLED, {}, "cancelled"),
    ):
        r = await new_saga(store)
        assert await send(store, r.id, "before")
        await move_to(store, r.id, ending, **fields)
        written = await row(store, r.id)
        for signal_id in ("before", "after"):  # a repeat too: refused, not deduplicated
            with pytest.raises(InvalidSagaState) as refused:
                await send(store, r.id, signal_id, name="nudge")
            assert (refused.value.saga_id, refused.value.state) == (r.id, state)
            assert "signal 'nudge' to" in str(refused.value)
        assert [s.signal_id for s in await store.signals(r.id)] == ["before"]
        assert await store.get(r.id) == written

    parked = await new_saga(store)
    await move_to(store, parked.id, Kind.SAGA_PARKED, error=ERR_FAIL)
    assert await send(store, parked.id, "s"), "a saga that needs attention may get signals"


async def test_signals_come_in_order_of_arrival(stores: Stores) -> None:
    store = await stores.open()
    a, b = await new_saga(store), await new_saga(store)
    sent = [(a, "a1", "x"), (b, "b1", "x"), (a, "a2", "y"), (a, "a3", "x"), (b, "b2", "y")]
    for saga, signal_id, name in sent:
        assert await send(store, saga.id, signal_id, name=name)
    got_a, got_b = await store.signals(a.id), await store.signals(b.id)
    assert [(s.signal_id, s.name) for s in got_a] == [("a1", "x"), ("a2", "y"), ("a3", "x")]
    assert [s.signal_id for s in got_b] == ["b1", "b2"]
    ids = sorted([*got_a, *got_b], key=lambda s: s.id)
    assert [s.signal_id for s in ids] == ["a1", "b1", "a2", "a3", "b2"], "ids order all arrivals"
    assert len({s.id for s in ids}) == 5
    assert [s.signal_id for s in await store.signals(a.id, "x")] == ["a1", "a3"]
    assert [s.signal_id for s in await store.signals(b.id, "y")] == ["b2"]
    assert await store.signals(a.id, "z") == []


async def test_cancel_requests_are_cancel_signals_to_active_sagas_after_an_id(
    stores: Stores,
) -> None:
    store = await stores.open()
    started, running, compensating, done, parked = [await new_saga(store) for _ in range(5)]
    await move_to(store, running.id, Kind.STEP_STARTED, seq=0, step="a", attempt=1)
    await move_to(store, compensating.id, Kind.SAGA_COMPENSATING, error=ERR_FAIL)
    assert await store.cancel_requests(0) == []
    for r in (started, running, compensating, done, parked):
        assert await store.send_signal(r.id, f"cancel-{r.id}", CANCEL_SIGNAL, None, time.time())
        assert await send(store, r.id, "not-a-cancel", name="sagakit.other")
    await move_to(store, done.id, Kind.SAGA_COMPLETED, payload="1")
    await move_to(store, parked.id, Kind.SAGA_PARKED, error=ERR_FAIL)

    found = await store.cancel_requests(0)
    assert [s.saga_id for s in found] == [started.id, running.id, compensating.id]
    assert all(s.name == CANCEL_SIGNAL and s.payload is None for s in found)
    assert [s.id for s in found] == sorted(s.id for s in found)
    assert await store.cancel_requests(found[0].id) == found[1:]
    assert await store.cancel_requests(found[-1].id) == []


# -- wake, next_wake, append_checked -----------------------------------------------------------


async def test_wake_makes_a_suspended_saga_claimable_and_is_a_no_op_otherwise(
    stores: Stores,
) -> None:
    store = await stores.worker()
    r = await asleep(store)
    awake = await new_saga(store, owner=store.worker_id)
    await store.wake(r.id)
    await store.wake(awake.id)
    await store.wake("no-such-saga")
    assert (await row(store, r.id)).wake_at is None
    assert await store.get(awake.id) == awake
    (c,) = await store.claim(10)
    assert c.record.id == r.id


async def test_next_wake_is_the_earliest_wake_time_of_an_active_saga(stores: Stores) -> None:
    store = await stores.worker()
    assert await store.next_wake() is None
    await new_saga(store, owner=store.worker_id)  # awake: no wake time
    t0 = time.time()
    late = await new_saga(store, owner=store.worker_id)
    await store.suspend(late.id, t0 + 200, {}, [])
    assert await store.next_wake() == t0 + 200
    early = await new_saga(store, owner=store.worker_id)
    await store.suspend(early.id, t0 + 100, {}, [])
    assert await store.next_wake() == t0 + 100

    # A saga that ended keeps no wake time that counts (unfenced writes of a non-worker store).
    operator = await stores.open()
    ended = await new_saga(store)
    await operator.suspend(ended.id, t0 + 50, {}, [])
    await operator.append(ended.id, [Journal(ended).new(Kind.SAGA_FAILED)])
    assert (await row(store, ended.id)).wake_at == t0 + 50
    assert await store.next_wake() == t0 + 100
    await store.wake(early.id)
    assert await store.next_wake() == t0 + 200


async def test_append_checked_clears_wake_at(stores: Stores) -> None:
    store = await stores.worker()
    r = await asleep(store)
    updated = await move_to(store, r.id, Kind.SAGA_PARKED, error=ERR_FAIL)
    assert (updated.wake_at, updated.owner) == (None, None)
    assert await store.get(r.id) == updated


# -- the clock: SQLite -------------------------------------------------------------------------


async def test_sqlite_timers_follow_the_store_clock(tmp_path: Path) -> None:
    clock = VirtualClock(start=1_000_000.0)
    store = SqliteStore(str(tmp_path / "sagas.db"), clock=clock)
    await store.open()
    try:
        await store.start_worker(lambda: None)
        assert store.clock_bounds() == (1_000_000.0, 1_000_000.0)
        r = await new_saga(store, owner=store.worker_id)
        await store.suspend(r.id, 1_000_060.0, {}, [])
        assert await store.claim(10) == []
        await clock.advance(59.9, settle=0)
        assert store.clock_bounds() == (clock.now(), clock.now())
        assert await store.claim(10) == [], "a timer never fires early"
        await clock.advance(0.1, settle=0)
        (c,) = await store.claim(10)
        assert c.record.id == r.id
    finally:
        await store.stop_worker()
        await store.close()


# -- the clock and races: PostgreSQL -----------------------------------------------------------


async def db_now(url: str) -> float:
    async with pg_conn(url) as conn:
        return float(await conn.fetchval("SELECT extract(epoch from clock_timestamp())"))


async def test_pg_clock_bounds_bracket_the_database_clock(pg_stores: Stores) -> None:
    store = await pg_stores.open()
    for _ in range(5):
        lower, _ = store.clock_bounds()
        now = await db_now(pg_stores.url)
        _, upper = store.clock_bounds()
        assert lower <= now <= upper
        assert upper - lower < 0.5
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        store.clock_bounds()


async def test_pg_heartbeats_read_the_clock_again(pg_stores: Stores) -> None:
    worker = await pg_stores.worker(lease=0.3)
    first = worker._waits.clock  # type: ignore[attr-defined]
    assert first is not None
    await eventually(lambda: _changed(worker, first), timeout=2.0)
    lower, _ = worker.clock_bounds()
    now = await db_now(pg_stores.url)
    _, upper = worker.clock_bounds()
    assert lower <= now <= upper


async def _changed(store: Store, reading: Any) -> bool:
    return store._waits.clock is not reading  # type: ignore[attr-defined]


async def test_pg_a_timer_fires_by_the_database_clock_never_early(pg_stores: Stores) -> None:
    store = await pg_stores.worker()
    r = await new_saga(store, owner=store.worker_id)
    _, upper = store.clock_bounds()
    wake_at = upper + 0.5
    await store.suspend(r.id, wake_at, {}, [])
    assert await store.next_wake() == wake_at
    (c,) = await eventually(lambda: store.claim(10), timeout=3.0)
    assert await db_now(pg_stores.url) >= wake_at, "claimed before its time"
    assert c.record.id == r.id


async def test_pg_a_timer_due_soon_is_announced(pg_stores: Stores) -> None:
    woken = asyncio.Event()
    store = await pg_stores.worker(wake=woken.set)
    soon, later = [await new_saga(store, owner=store.worker_id) for _ in range(2)]
    await asyncio.sleep(0.1)
    woken.clear()
    await store.suspend(later.id, LATER, {}, [])
    await asyncio.sleep(0.2)
    assert not woken.is_set(), "a far timer wakes no worker"
    await store.suspend(soon.id, store.clock_bounds()[1] + 0.2, {}, [])
    await asyncio.wait_for(woken.wait(), 2.0)


async def blocked_by(conn: Any) -> bool:
    """Whether some backend waits for a lock that ``conn``'s transaction holds."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")  # else read once per transaction
    found = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
    )
    return bool(found)


async def test_pg_a_signal_committed_while_suspend_waits_for_the_row_wakes_it(
    pg_stores: Stores,
) -> None:
    store = await pg_stores.worker()
    r = await new_saga(store, owner=store.worker_id)
    async with pg_conn(pg_stores.url) as conn, conn.transaction():
        # What send_signal does, stopped before its commit.
        await conn.execute(
            "INSERT INTO sagakit_signals (saga_id, signal_id, name, at) VALUES ($1, 's', 'go', 0)",
            r.id,
        )
        await conn.execute("UPDATE sagakit_sagas SET wake_at = NULL WHERE id = $1", r.id)
        suspending = asyncio.create_task(store.suspend(r.id, WAIT_FOREVER, {"go": 0}, []))
        await eventually(lambda: blocked_by(conn))
    await suspending
    assert (await row(store, r.id)).wake_at is None


async def test_pg_a_signal_sent_while_suspend_holds_the_row_wakes_it(
    pg_stores: Stores,
) -> None:
    store = await pg_stores.worker()
    r = await new_saga(store, owner=store.worker_id)
    async with pg_conn(pg_stores.url) as conn, conn.transaction():
        # What suspend does, stopped before its commit (it found no signal).
        await conn.execute(
            "UPDATE sagakit_sagas SET owner = NULL, wake_at = $2 WHERE id = $1", r.id, LATER
        )
        sending = asyncio.create_task(send(store, r.id, "s", name="go"))
        await eventually(lambda: blocked_by(conn))
    assert await sending
    assert (await row(store, r.id)).wake_at is None


async def test_pg_a_wake_while_suspend_holds_the_row_wakes_it(pg_stores: Stores) -> None:
    store = await pg_stores.worker()
    r = await new_saga(store, owner=store.worker_id)
    async with pg_conn(pg_stores.url) as conn, conn.transaction():
        # What suspend does, stopped before its commit (the child had not ended yet).
        await conn.execute(
            "UPDATE sagakit_sagas SET owner = NULL, wake_at = $2 WHERE id = $1", r.id, LATER
        )
        waking = asyncio.create_task(store.wake(r.id))
        await eventually(lambda: blocked_by(conn))
    await waking
    assert (await row(store, r.id)).wake_at is None


async def test_pg_a_saga_that_ends_while_a_signal_waits_for_its_row_gets_none(
    pg_stores: Stores,
) -> None:
    store = await pg_stores.open()
    r = await new_saga(store)
    async with pg_conn(pg_stores.url) as conn, conn.transaction():
        await conn.execute("UPDATE sagakit_sagas SET state = 'completed' WHERE id = $1", r.id)
        sending = asyncio.create_task(send(store, r.id, "s"))
        await eventually(lambda: blocked_by(conn))
    with pytest.raises(InvalidSagaState):
        await sending
    assert await store.signals(r.id) == []


async def test_pg_signals_racing_suspend_never_leave_a_saga_asleep(pg_stores: Stores) -> None:
    worker = await pg_stores.worker(pool_size=4)
    client = await pg_stores.open(pool_size=4)
    sagas = [await new_saga(worker, owner=worker.worker_id) for _ in range(50)]

    async def jittered(coro: Any) -> Any:
        await asyncio.sleep(random.random() * 0.003)
        return await coro

    for i, r in enumerate(sagas):
        # Half the races suspend with a timer, half for the signal alone.
        wake_at = LATER if i % 2 else WAIT_FOREVER
        await asyncio.gather(
            jittered(worker.suspend(r.id, wake_at, {"go": 0}, [])),
            jittered(send(client, r.id, f"s-{i}", name="go")),
        )
    rows = [await row(worker, r.id) for r in sagas]
    assert [r.id for r in rows if r.wake_at is not None] == []
    assert {r.owner for r in rows} == {None}
    assert len(await worker.claim(100)) == 50
