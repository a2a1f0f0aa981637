"""The Store contract, written once and run on SQLite and on PostgreSQL (CONVENTIONS rule 3).

Every method of :class:`sagakit.store.base.Store` is exercised with the same assertions on
both backends. What exists on one backend only is tested on that backend at the end: the
PostgreSQL leases, dead-connection takeover, NOTIFY wake-ups and concurrent migrations, and
the SQLite file lock and bad paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest

from sagakit.errors import (
    ConfigurationError,
    DatabaseOwned,
    FencedOut,
    SagaNotFound,
    SchemaTooNew,
    StoreError,
    StoreUnavailable,
)
from sagakit.journal import Entry, Kind, SagaState, project
from sagakit.store import open_store
from sagakit.store.base import Claimed, SagaRecord, Store
from sagakit.store.sqlite import migrations

ERR_RETRY = {"type": "ConnectionError", "module": "builtins", "message": "try again"}
ERR_FAIL = {"type": "RuntimeError", "module": "builtins", "message": "card declined"}
ERR_SAGA = {"type": "StepFailed", "module": "sagakit.errors", "message": "charge failed"}
OTHER_WORKER = "other-host:4242:deadbeef"


def backend(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgres"


def latest_migration(url: str) -> int:
    return migrations(backend(url))[-1][0]


# -- records and entries -----------------------------------------------------------------------


def make_record(
    *,
    key: str | None = None,
    saga_type: str = "Order",
    created_at: float | None = None,
    owner: str | None = None,
    data: str = '{"n": 1}',
) -> SagaRecord:
    now = time.time() if created_at is None else created_at
    return SagaRecord(
        id=str(uuid.uuid4()),
        saga_type=saga_type,
        version=1,
        state=SagaState.STARTED,
        idempotency_key=key,
        input=data,
        output=None,
        error=None,
        current_step=None,
        deadline=now + 60,
        created_at=now,
        updated_at=now,
        owner=owner,
    )


def first_entry(r: SagaRecord) -> Entry:
    return Entry(
        saga_id=r.id,
        index=0,
        kind=Kind.SAGA_STARTED,
        at=r.created_at,
        payload=r.input,
        data={"version": r.version},
    )


class Journal:
    """Builds the entries of one saga with consecutive indexes, and remembers them."""

    def __init__(self, record: SagaRecord) -> None:
        self.saga_id = record.id
        self.entries = [first_entry(record)]

    def new(self, kind: Kind, **fields: Any) -> Entry:
        e = Entry(
            saga_id=self.saga_id,
            index=len(self.entries),
            kind=kind,
            at=max(time.time(), self.entries[-1].at + 1e-6),
            **fields,
        )
        self.entries.append(e)
        return e

    def batch(self, *specs: tuple[Kind, dict[str, Any]]) -> list[Entry]:
        return [self.new(kind, **fields) for kind, fields in specs]


def k(kind: Kind, **fields: Any) -> tuple[Kind, dict[str, Any]]:
    return kind, fields


async def new_saga(store: Store, **kwargs: Any) -> SagaRecord:
    r = make_record(**kwargs)
    stored, created = await store.create(r, first_entry(r))
    assert created
    assert stored == r
    return r


async def assert_row_is_projection(store: Store, saga_id: str, expected: list[Entry]) -> None:
    """The stored journal is exactly ``expected``, and the row is its projection."""
    journal = await store.journal(saga_id)
    assert journal == expected
    row = await store.get(saga_id)
    assert row is not None
    p = project(journal)
    assert (row.state, row.current_step, row.output, row.error) == (
        p.state,
        p.current_step,
        p.output,
        p.error,
    )
    assert row.updated_at == journal[-1].at


def decide_with(*kinds: tuple[Kind, dict[str, Any]]) -> Callable[..., list[Entry]]:
    """A ``decide`` for append_checked that appends ``kinds`` after the journal it is shown."""

    def decide(record: SagaRecord, journal: list[Entry]) -> list[Entry]:
        at = time.time()
        return [
            Entry(saga_id=record.id, index=journal[-1].index + 1 + i, kind=kind, at=at, **fields)
            for i, (kind, fields) in enumerate(kinds)
        ]

    return decide


async def move_to(store: Store, saga_id: str, kind: Kind, **fields: Any) -> SagaRecord:
    """Move a saga (owned by anyone) to another state through the unfenced operator path."""
    return await store.append_checked(saga_id, decide_with(k(kind, **fields)))


# -- PostgreSQL side channel -------------------------------------------------------------------


def pg_parts(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    schema = parse_qs(parts.query)["schema"][0]
    return urlunsplit(parts._replace(query="")), schema


@contextlib.asynccontextmanager
async def pg_conn(url: str) -> AsyncIterator[Any]:
    import asyncpg

    dsn, schema = pg_parts(url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        yield conn
    finally:
        await conn.close()


async def wait_registered(url: str, worker_id: str, timeout: float = 2.0) -> int:
    """Wait until the worker's heartbeat registered it; return its backend pid."""
    deadline = time.monotonic() + timeout
    async with pg_conn(url) as conn:
        while True:
            pid = await conn.fetchval(
                "SELECT backend_pid FROM sagakit_workers WHERE id = $1", worker_id
            )
            if pid is not None:
                return int(pid)
            assert time.monotonic() < deadline, f"worker {worker_id} never registered"
            await asyncio.sleep(0.01)


async def eventually(probe: Callable[[], Any], timeout: float = 2.0) -> Any:
    """Await ``probe()`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        found = await probe()
        if found:
            return found
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- fixtures ----------------------------------------------------------------------------------


class Stores:
    """Opens stores on one URL; every one is closed after the test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.backend = backend(url)
        self.opened: list[Store] = []

    async def open(self, url: str | None = None, **kwargs: Any) -> Store:
        store = open_store(url or self.url, **kwargs)
        self.opened.append(store)
        await store.open()
        return store

    async def worker(self, wake: Callable[[], None] | None = None, **kwargs: Any) -> Store:
        store = await self.open(**kwargs)
        await store.start_worker(wake or (lambda: None))
        if self.backend == "postgres":
            await wait_registered(self.url, store.worker_id)
        return store

    async def close_all(self) -> None:
        for store in reversed(self.opened):
            # A test may leave a worker's heartbeat running on purpose (a "paused" worker).
            beat = getattr(store, "_beat_task", None)
            if beat is not None:
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)
            with contextlib.suppress(Exception):  # a store the test closed itself
                await store.close()


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


# -- open, schema ------------------------------------------------------------------------------


async def test_schema_version_is_the_latest_migration(stores: Stores) -> None:
    store = await stores.open()
    assert await store.schema_version() == latest_migration(stores.url)
    assert store.location.startswith(("sqlite:///", "postgresql://"))
    again = await stores.open()  # opening a migrated database migrates nothing
    assert await again.schema_version() == latest_migration(stores.url)
    await store.open()  # a second open() of the same store is a no-op
    assert await store.schema_version() == latest_migration(stores.url)


async def test_concurrent_first_opens_migrate_once(stores: Stores) -> None:
    opened = await asyncio.gather(*(stores.open() for _ in range(3)))
    latest = latest_migration(stores.url)
    assert [await s.schema_version() for s in opened] == [latest] * 3
    if stores.backend == "postgres":
        async with pg_conn(stores.url) as conn:
            versions = [r[0] for r in await conn.fetch("SELECT version FROM sagakit_schema")]
    else:
        with contextlib.closing(sqlite3.connect(stores.url.removeprefix("sqlite:///"))) as conn:
            versions = [r[0] for r in conn.execute("SELECT version FROM sagakit_schema")]
    assert sorted(versions) == list(range(1, latest + 1)), "each migration applied exactly once"
    r = await new_saga(opened[0])
    assert await opened[2].get(r.id) == r


async def test_schema_too_new_refuses_to_open_and_changes_nothing(stores: Stores) -> None:
    store = await stores.open()
    await new_saga(store)
    await store.close()
    latest = latest_migration(stores.url)
    if stores.backend == "postgres":
        async with pg_conn(stores.url) as conn:
            await conn.execute("INSERT INTO sagakit_schema (version) VALUES (999)")
    else:
        with contextlib.closing(sqlite3.connect(stores.url.removeprefix("sqlite:///"))) as conn:
            conn.execute("INSERT INTO sagakit_schema (version) VALUES (999)")
            conn.commit()

    newer = open_store(stores.url)
    with pytest.raises(SchemaTooNew) as raised:
        await newer.open()
    assert (raised.value.found, raised.value.supported) == (999, latest)
    assert "upgrade sagakit" in str(raised.value)

    if stores.backend == "postgres":
        async with pg_conn(stores.url) as conn:
            versions = sorted(r[0] for r in await conn.fetch("SELECT version FROM sagakit_schema"))
            count = await conn.fetchval("SELECT count(*) FROM sagakit_sagas")
    else:
        with contextlib.closing(sqlite3.connect(stores.url.removeprefix("sqlite:///"))) as conn:
            versions = sorted(r[0] for r in conn.execute("SELECT version FROM sagakit_schema"))
            count = conn.execute("SELECT count(*) FROM sagakit_sagas").fetchone()[0]
    assert versions == [*range(1, latest + 1), 999]
    assert count == 1


# -- create ------------------------------------------------------------------------------------


async def test_create_stores_the_record_and_its_first_entry(stores: Stores) -> None:
    store = await stores.open()
    r = make_record(key="order-1")
    stored, created = await store.create(r, first_entry(r))
    assert (stored, created) == (r, True)
    assert await store.get(r.id) == r
    assert await store.journal(r.id) == [first_entry(r)]
    assert await store.get("no-such-saga") is None
    assert await store.journal("no-such-saga") == []
    unkeyed = [await new_saga(store) for _ in range(2)]  # no key: never a conflict
    assert len({u.id for u in unkeyed}) == 2


async def test_create_with_a_used_key_returns_the_existing_saga(stores: Stores) -> None:
    store = await stores.open()
    r = await new_saga(store, key="k", data='{"first": true}')
    again = make_record(key="k", data='{"second": true}')
    stored, created = await store.create(again, first_entry(again))
    assert created is False
    assert stored == r
    assert await store.get(again.id) is None, "the losing record was not written"
    assert await store.journal(again.id) == []
    assert await store.journal(r.id) == [first_entry(r)]
    assert len(await store.list_sagas()) == 1


async def test_many_concurrent_creates_with_one_key_make_one_saga(stores: Stores) -> None:
    a, b = await stores.open(), await stores.open()
    records = [make_record(key="shared", data=f'{{"i": {i}}}') for i in range(40)]
    results = await asyncio.gather(
        *((a if i % 2 else b).create(r, first_entry(r)) for i, r in enumerate(records))
    )
    winners = [i for i, (_, created) in enumerate(results) if created]
    assert len(winners) == 1
    winner = records[winners[0]]
    assert {stored.id for stored, _ in results} == {winner.id}
    assert all(stored.input == winner.input for stored, _ in results)
    assert [s.id for s in await a.list_sagas()] == [winner.id]
    assert await b.journal(winner.id) == [first_entry(winner)]
    for loser in records:
        if loser is not winner:
            assert await a.get(loser.id) is None
            assert await a.journal(loser.id) == []


# -- append ------------------------------------------------------------------------------------


async def test_append_keeps_journal_order_and_the_row_is_its_projection(stores: Stores) -> None:
    store = await stores.worker()
    r = await new_saga(store, owner=store.worker_id)
    j = Journal(r)
    batches = [
        j.batch(k(Kind.STEP_STARTED, seq=0, step="reserve", attempt=1)),
        j.batch(k(Kind.STEP_COMPLETED, seq=0, step="reserve", attempt=1, payload='{"held": 2}')),
        j.batch(
            k(Kind.STEP_STARTED, seq=1, step="charge", attempt=1),
            k(
                Kind.STEP_RETRYING,
                seq=1,
                step="charge",
                attempt=1,
                error=ERR_RETRY,
                data={"retry_in": 0.25},
            ),
            k(Kind.STEP_STARTED, seq=1, step="charge", attempt=2),
        ),
        j.batch(k(Kind.STEP_FAILED, seq=1, step="charge", attempt=2, error=ERR_FAIL)),
        j.batch(
            k(Kind.SAGA_COMPENSATING, error=ERR_SAGA),
            k(Kind.COMPENSATION_STARTED, seq=0, step="reserve", attempt=1),
        ),
        j.batch(k(Kind.COMPENSATION_COMPLETED, seq=0, step="reserve", attempt=1)),
        j.batch(k(Kind.SAGA_FAILED)),
    ]
    states = []
    for batch in batches:
        await store.append(r.id, batch)
        await assert_row_is_projection(store, r.id, j.entries[: batch[-1].index + 1])
        row = await store.get(r.id)
        assert row is not None
        states.append(row.state)
        assert (row.owner, row.input, row.created_at) == (store.worker_id, r.input, r.created_at)
    assert states == [
        SagaState.RUNNING,
        SagaState.RUNNING,
        SagaState.RUNNING,
        SagaState.RUNNING,
        SagaState.COMPENSATING,
        SagaState.COMPENSATING,
        SagaState.FAILED,
    ]
    row = await store.get(r.id)
    assert row is not None
    assert (row.current_step, row.error, row.output) == ("charge", ERR_SAGA, None)


async def test_append_of_a_completed_saga_sets_output_and_keeps_the_last_error(
    stores: Stores,
) -> None:
    store = await stores.worker()
    r = await new_saga(store, owner=store.worker_id)
    j = Journal(r)
    await store.append(
        r.id,
        j.batch(
            k(Kind.VALUE_RECORDED, seq=0, data={"name": "now", "value": "2024-01-01T00:00:00"}),
            k(Kind.STEP_STARTED, seq=1, step="pay", attempt=1),
        ),
    )
    await store.append(
        r.id, j.batch(k(Kind.STEP_RETRYING, seq=1, step="pay", attempt=1, error=ERR_RETRY))
    )
    await store.append(
        r.id,
        j.batch(
            k(Kind.STEP_STARTED, seq=1, step="pay", attempt=2),
            k(Kind.STEP_COMPLETED, seq=1, step="pay", attempt=2, payload='"paid"'),
            k(Kind.SAGA_COMPLETED, payload='{"pay": "paid"}'),
        ),
    )
    await assert_row_is_projection(store, r.id, j.entries)
    row = await store.get(r.id)
    assert row is not None
    assert (row.state, row.output, row.current_step) == (
        SagaState.COMPLETED,
        '{"pay": "paid"}',
        "pay",
    )
    assert row.error == ERR_RETRY, "the row keeps the last error, as the projection does"


async def test_concurrent_appends_of_many_sagas_keep_each_journal_in_order(
    stores: Stores,
) -> None:
    store = await stores.worker()
    sagas = [await new_saga(store, owner=store.worker_id) for _ in range(10)]
    journals = {r.id: Journal(r) for r in sagas}

    async def run(r: SagaRecord) -> None:
        j = journals[r.id]
        for seq, name in enumerate(("a", "b", "c")):
            await store.append(r.id, j.batch(k(Kind.STEP_STARTED, seq=seq, step=name, attempt=1)))
            await store.append(
                r.id,
                j.batch(k(Kind.STEP_COMPLETED, seq=seq, step=name, attempt=1, payload=f'"{name}"')),
            )
        await store.append(r.id, j.batch(k(Kind.SAGA_COMPLETED, payload='"done"')))

    await asyncio.gather(*(run(r) for r in sagas))
    for r in sagas:
        await assert_row_is_projection(store, r.id, journals[r.id].entries)
    assert await store.counts() == {"completed": 10}


async def test_append_soon_commits_before_a_later_append_in_order(stores: Stores) -> None:
    store = await stores.worker()
    s = await new_saga(store, owner=store.worker_id)
    t = await new_saga(store, owner=store.worker_id)
    js, jt = Journal(s), Journal(t)

    store.append_soon(s.id, js.batch(k(Kind.STEP_STARTED, seq=0, step="a", attempt=1)))
    store.append_soon(
        s.id,
        js.batch(
            k(Kind.STEP_COMPLETED, seq=0, step="a", attempt=1, payload="1"),
            k(Kind.VALUE_RECORDED, seq=1, data={"name": "uuid", "value": "u"}),
        ),
    )
    store.append_soon(t.id, jt.batch(k(Kind.STEP_STARTED, seq=0, step="x", attempt=1)))
    await store.append(s.id, js.batch(k(Kind.STEP_STARTED, seq=2, step="b", attempt=1)))

    await assert_row_is_projection(store, s.id, js.entries)
    # The queued entry of another saga committed with (or before) that durable append too.
    await assert_row_is_projection(store, t.id, jt.entries)


async def test_append_soon_is_committed_by_close(stores: Stores) -> None:
    store = await stores.worker()
    r = await new_saga(store, owner=store.worker_id)
    j = Journal(r)
    store.append_soon(r.id, j.batch(k(Kind.STEP_STARTED, seq=0, step="a", attempt=1)))
    await store.stop_worker()
    await store.close()
    reader = await stores.open()
    await assert_row_is_projection(reader, r.id, j.entries)


async def test_append_to_a_saga_this_worker_does_not_own_is_fenced(stores: Stores) -> None:
    store = await stores.worker()
    mine = [await new_saga(store, owner=store.worker_id) for _ in range(2)]
    theirs = await new_saga(store, owner=OTHER_WORKER)
    nobodys = await new_saga(store, owner=None)
    journals = {r.id: Journal(r) for r in (*mine, theirs, nobodys)}

    def step_started(r: SagaRecord) -> list[Entry]:
        return journals[r.id].batch(k(Kind.STEP_STARTED, seq=0, step="a", attempt=1))

    order = [mine[0], theirs, mine[1], nobodys]
    results = await asyncio.gather(
        *(store.append(r.id, step_started(r)) for r in order), return_exceptions=True
    )
    assert results[0] is None
    assert results[2] is None
    for refused, r in ((results[1], theirs), (results[3], nobodys)):
        assert isinstance(refused, FencedOut), refused
        assert (refused.saga_id, refused.worker) == (r.id, store.worker_id)
        assert await store.journal(r.id) == [first_entry(r)], "a fenced append writes no entry"
        assert await store.get(r.id) == r, "...and leaves the row as it was"
    for r in mine:
        await assert_row_is_projection(store, r.id, journals[r.id].entries)

    # A fenced append_soon is dropped without failing the durable append behind it.
    store.append_soon(theirs.id, [Journal(theirs).new(Kind.STEP_STARTED, seq=0, step="z")])
    j0 = journals[mine[0].id]
    await store.append(mine[0].id, j0.batch(k(Kind.STEP_COMPLETED, seq=0, step="a", attempt=1)))
    await assert_row_is_projection(store, mine[0].id, j0.entries)
    assert await store.journal(theirs.id) == [first_entry(theirs)]
    assert await store.get(theirs.id) == theirs


async def test_append_over_an_existing_index_fails_alone_and_keeps_the_cause(
    stores: Stores,
) -> None:
    store = await stores.worker()
    bad = await new_saga(store, owner=store.worker_id)
    good = await new_saga(store, owner=store.worker_id)
    jg = Journal(good)
    clash = Entry(
        saga_id=bad.id, index=0, kind=Kind.STEP_STARTED, at=time.time(), seq=0, step="a", attempt=1
    )
    results = await asyncio.gather(
        store.append(bad.id, [clash]),
        store.append(good.id, jg.batch(k(Kind.STEP_STARTED, seq=0, step="a", attempt=1))),
        return_exceptions=True,
    )
    assert results[1] is None, "one bad write does not fail the others of its batch"
    assert isinstance(results[0], StoreError), results[0]
    assert not isinstance(results[0], FencedOut)
    assert results[0].__cause__ is not None, "the driver's error is kept as the cause"
    assert await store.journal(bad.id) == [first_entry(bad)]
    assert await store.get(bad.id) == bad
    await assert_row_is_projection(store, good.id, jg.entries)


# -- append_checked ----------------------------------------------------------------------------


async def test_append_checked_decides_on_row_and_journal_then_releases(stores: Stores) -> None:
    store = await stores.worker()
    r = await new_saga(store, owner=store.worker_id)
    j = Journal(r)
    await store.append(
        r.id,
        j.batch(
            k(Kind.STEP_STARTED, seq=0, step="a", attempt=1),
            k(Kind.STEP_FAILED, seq=0, step="a", attempt=1, error=ERR_FAIL),
            k(Kind.SAGA_COMPENSATING, error=ERR_SAGA),
            k(Kind.COMPENSATION_EXHAUSTED, seq=0, step="a", attempt=3, error=ERR_RETRY),
        ),
    )
    seen: list[tuple[SagaRecord, list[Entry]]] = []

    def decide(record: SagaRecord, journal: list[Entry]) -> list[Entry]:
        seen.append((record, journal))
        return [j.new(Kind.OPERATOR_RETRY, data={"resume": "compensating"})]

    updated = await store.append_checked(r.id, decide)
    ((row_seen, journal_seen),) = seen
    assert journal_seen == j.entries[:-1]
    assert row_seen.state is SagaState.NEEDS_ATTENTION
    assert row_seen.owner == store.worker_id
    assert updated == await store.get(r.id)
    assert updated.state is SagaState.COMPENSATING
    assert updated.owner is None, "the saga is released for any worker to claim"
    await assert_row_is_projection(store, r.id, j.entries)


async def test_append_checked_works_on_a_saga_another_worker_owns(stores: Stores) -> None:
    store = await stores.worker()
    r = await new_saga(store, owner=OTHER_WORKER)
    updated = await move_to(store, r.id, Kind.SAGA_PARKED, error=ERR_FAIL)
    assert (updated.state, updated.owner, updated.error) == (
        SagaState.NEEDS_ATTENTION,
        None,
        ERR_FAIL,
    )
    journal = await store.journal(r.id)
    assert [e.kind for e in journal] == [Kind.SAGA_STARTED, Kind.SAGA_PARKED]
    await assert_row_is_projection(store, r.id, journal)


async def test_append_checked_that_raises_writes_nothing(stores: Stores) -> None:
    store = await stores.worker()
    r = await new_saga(store, owner=store.worker_id)

    class Refused(Exception):
        pass

    def decide(record: SagaRecord, journal: list[Entry]) -> list[Entry]:
        raise Refused("not in needs_attention")

    with pytest.raises(Refused):
        await store.append_checked(r.id, decide)
    assert await store.get(r.id) == r, "the row, owner included, is unchanged"
    assert await store.journal(r.id) == [first_entry(r)]

    with pytest.raises(SagaNotFound) as missing:
        await store.append_checked("no-such-saga", decide_with(k(Kind.SAGA_PARKED)))
    assert missing.value.saga_id == "no-such-saga"


async def test_concurrent_append_checked_on_one_saga_decide_one_after_another(
    stores: Stores,
) -> None:
    """Operator actions race: each decide sees what the previous one wrote."""
    a, b = await stores.open(), await stores.open()
    r = await new_saga(a)
    await move_to(a, r.id, Kind.SAGA_PARKED, error=ERR_FAIL)

    class NotParked(Exception):
        pass

    def retry(record: SagaRecord, journal: list[Entry]) -> list[Entry]:
        if record.state is not SagaState.NEEDS_ATTENTION:
            raise NotParked(record.state)
        return decide_with(k(Kind.OPERATOR_RETRY, data={"resume": "running"}))(record, journal)

    results = await asyncio.gather(
        *((a, b)[i % 2].append_checked(r.id, retry) for i in range(6)), return_exceptions=True
    )
    done = [x for x in results if isinstance(x, SagaRecord)]
    assert len(done) == 1, results
    assert all(isinstance(x, NotParked) for x in results if x not in done)
    journal = await a.journal(r.id)
    assert [e.kind for e in journal] == [Kind.SAGA_STARTED, Kind.SAGA_PARKED, Kind.OPERATOR_RETRY]
    await assert_row_is_projection(a, r.id, journal)
    assert done[0].state is SagaState.RUNNING


# -- claim, release ----------------------------------------------------------------------------


async def test_claim_needs_start_worker(stores: Stores) -> None:
    store = await stores.open()
    with pytest.raises(StoreError):
        await store.claim(10)


async def test_claim_takes_unowned_active_sagas_oldest_first(stores: Stores) -> None:
    setup = await stores.open()
    t0 = time.time() - 100
    middle = await new_saga(setup, created_at=t0 + 2)
    oldest = await new_saga(setup, created_at=t0 + 1)
    newest = await new_saga(setup, created_at=t0 + 3)
    done = await new_saga(setup, created_at=t0)
    parked = await new_saga(setup, created_at=t0)
    failed = await new_saga(setup, created_at=t0)
    await move_to(setup, done.id, Kind.SAGA_COMPLETED, payload="1")
    await move_to(setup, parked.id, Kind.SAGA_PARKED, error=ERR_FAIL)
    await move_to(setup, failed.id, Kind.SAGA_FAILED)
    compensating = await new_saga(setup, created_at=t0 + 4)
    await move_to(setup, compensating.id, Kind.SAGA_COMPENSATING, error=ERR_SAGA)

    store = await stores.worker()
    first = await store.claim(2)
    assert [c.record.id for c in first] == [oldest.id, middle.id]
    for c in first:
        assert isinstance(c, Claimed)
        assert c.record.owner == store.worker_id
        assert c.record.recoveries == 0, "taking an unowned saga is not a recovery"
        assert c.journal == await store.journal(c.record.id)
        assert await store.get(c.record.id) == c.record
    rest = await store.claim(10)
    assert [c.record.id for c in rest] == [newest.id, compensating.id]
    assert rest[1].record.state is SagaState.COMPENSATING
    assert [e.kind for e in rest[1].journal] == [Kind.SAGA_STARTED, Kind.SAGA_COMPENSATING]
    assert await store.claim(10) == [], "sagas this worker owns, or that rest, are not taken"
    for resting in (done, parked, failed):
        row = await store.get(resting.id)
        assert row is not None
        assert row.owner is None


async def test_claim_from_a_dead_owner_counts_a_recovery_and_release_gives_back(
    stores: Stores,
) -> None:
    setup = await stores.open()
    orphan = await new_saga(setup, owner=OTHER_WORKER)  # a worker that is gone
    store = await stores.worker()
    (c,) = await store.claim(10)
    assert (c.record.id, c.record.owner, c.record.recoveries) == (orphan.id, store.worker_id, 1)
    assert c.journal == [first_entry(orphan)]

    await store.release([orphan.id, "no-such-saga"])
    row = await store.get(orphan.id)
    assert row is not None
    assert (row.owner, row.recoveries) == (None, 1)
    (again,) = await store.claim(10)
    assert (again.record.owner, again.record.recoveries) == (store.worker_id, 1), (
        "a released saga is taken back without counting a recovery"
    )

    # release() gives up only what this worker owns.
    foreign = await new_saga(setup, owner=OTHER_WORKER)
    await store.release([foreign.id])
    assert await store.get(foreign.id) == foreign


async def test_claim_leaves_the_sagas_of_a_live_worker(stores: Stores) -> None:
    a = await stores.worker()
    owned = await new_saga(a, owner=a.worker_id)
    b = await stores.open()
    if stores.backend == "sqlite":
        with pytest.raises(DatabaseOwned):  # one live worker per file: it keeps its sagas
            await b.start_worker(lambda: None)
    else:
        await b.start_worker(lambda: None)
        await wait_registered(stores.url, b.worker_id)
        assert await b.claim(10) == []
    assert await a.claim(10) == []
    assert await a.get(owned.id) == owned

    await a.stop_worker()
    if stores.backend == "sqlite":
        await b.start_worker(lambda: None)
    (c,) = await b.claim(10)
    assert (c.record.id, c.record.owner, c.record.recoveries) == (owned.id, b.worker_id, 0)


async def test_stop_worker_releases_the_active_sagas_it_owns(stores: Stores) -> None:
    a = await stores.worker()
    active = [await new_saga(a, owner=a.worker_id) for _ in range(3)]
    done = await new_saga(a, owner=a.worker_id)
    jd = Journal(done)
    await a.append(done.id, jd.batch(k(Kind.SAGA_COMPLETED, payload="1")))
    foreign = await new_saga(a, owner=OTHER_WORKER)

    await a.stop_worker()
    for r in active:
        row = await a.get(r.id)
        assert row is not None
        assert (row.owner, row.recoveries) == (None, 0)
    assert await a.get(foreign.id) == foreign, "another worker's saga is not touched"
    if stores.backend == "postgres":
        async with pg_conn(stores.url) as conn:
            left = await conn.fetchval(
                "SELECT count(*) FROM sagakit_workers WHERE id = $1", a.worker_id
            )
        assert left == 0, "a stopped worker unregisters"

    b = await stores.worker()  # on SQLite: the file lock was dropped
    claimed = await b.claim(10)
    assert {c.record.id: c.record.recoveries for c in claimed} == {
        **{r.id: 0 for r in active},
        foreign.id: 1,
    }


# -- reading -----------------------------------------------------------------------------------


async def test_list_sagas_filters_and_pages_newest_first(stores: Stores) -> None:
    store = await stores.open()
    t0 = time.time() - 100
    made: list[SagaRecord] = []
    for i in range(9):
        # Three pairs share a created_at, so paging must also order by id.
        made.append(
            await new_saga(store, saga_type="Order" if i % 3 else "Refund", created_at=t0 + i // 2)
        )
    for r in made[::4]:
        await move_to(store, r.id, Kind.SAGA_COMPLETED, payload="1")
    rows = {r.id: await store.get(r.id) for r in made}
    expected = sorted(rows.values(), key=lambda r: (-r.created_at, r.id))  # type: ignore[union-attr]

    assert await store.list_sagas() == expected
    assert await store.list_sagas(state=SagaState.COMPLETED) == [
        r for r in expected if r and r.state is SagaState.COMPLETED
    ]
    assert await store.list_sagas(saga_type="Refund") == [
        r for r in expected if r and r.saga_type == "Refund"
    ]
    both = await store.list_sagas(state=SagaState.STARTED, saga_type="Order")
    assert both == [r for r in expected if r and r.saga_type == "Order" and r.state == "started"]
    assert both, "the combined filter is not trivially empty"
    pages = [await store.list_sagas(limit=2, offset=o) for o in range(0, 10, 2)]
    assert [len(p) for p in pages] == [2, 2, 2, 2, 1]
    assert [r for page in pages for r in page] == expected
    assert await store.list_sagas(limit=3, offset=9) == []
    assert await store.list_sagas(saga_type="Nope") == []
    assert await store.list_sagas(state=SagaState.CANCELLED) == []


async def test_by_idempotency_key_finds_the_one_saga_started_with_it(stores: Stores) -> None:
    store, other = await stores.open(), await stores.open()
    order = await new_saga(store, key="k-1")
    refund = await new_saga(store, saga_type="Refund", key="k-2")
    unkeyed = await new_saga(store)
    for s in (store, other):  # a second store on the same database sees the same rows
        assert await s.by_idempotency_key("k-1") == order
        assert await s.by_idempotency_key("k-2") == refund
        assert await s.by_idempotency_key("k-3") is None
        assert await s.by_idempotency_key(order.id) is None, "keys are not ids"
        assert await s.by_idempotency_key("") is None
        assert await s.by_idempotency_key("K-1") is None, "keys match exactly"
    assert unkeyed.idempotency_key is None
    # The current row, not the one the key was first stored with.
    moved = await move_to(store, order.id, Kind.SAGA_COMPLETED, payload="1")
    assert moved.state is SagaState.COMPLETED
    assert await store.by_idempotency_key("k-1") == await store.get(order.id)
    # A key is unique across saga types: a start of another type with it finds this saga.
    again = make_record(saga_type="Refund", key="k-1")
    stored, created = await store.create(again, first_entry(again))
    assert (stored.id, created) == (order.id, False)
    assert await store.by_idempotency_key("k-1") == await store.get(order.id)


async def test_counts_per_state(stores: Stores) -> None:
    store = await stores.open()
    assert await store.counts() == {}
    sagas = [await new_saga(store) for _ in range(6)]
    await move_to(store, sagas[0].id, Kind.SAGA_COMPLETED, payload="1")
    await move_to(store, sagas[1].id, Kind.SAGA_COMPLETED, payload="1")
    await move_to(store, sagas[2].id, Kind.SAGA_PARKED, error=ERR_FAIL)
    await move_to(store, sagas[3].id, Kind.STEP_STARTED, seq=0, step="a", attempt=1)
    assert await store.counts() == {
        "started": 2,
        "completed": 2,
        "needs_attention": 1,
        "running": 1,
    }
    refund = await new_saga(store, saga_type="Refund")
    await move_to(store, refund.id, Kind.SAGA_COMPLETED, payload="1")
    assert await store.counts("Refund") == {"completed": 1}
    assert (await store.counts("Order"))["completed"] == 2
    assert await store.counts("Nope") == {}
    assert (await store.counts())["completed"] == 3


# -- errors at the boundary --------------------------------------------------------------------


def sqlite_file_exists(url: str) -> bool:
    return Path(url.removeprefix("sqlite:///")).exists()


async def test_reads_of_an_unopened_store_say_it_is_not_open(stores: Stores) -> None:
    store = open_store(stores.url)
    with pytest.raises(StoreError) as raised:
        await store.get("x")
    assert "not open" in str(raised.value)
    if stores.backend == "sqlite":
        assert not sqlite_file_exists(stores.url), "a read created the file"


async def test_writes_of_an_unopened_store_say_it_is_not_open(stores: Stores) -> None:
    store = open_store(stores.url)
    r = make_record()
    with pytest.raises(StoreError) as raised:
        async with asyncio.timeout(1):  # not: wait forever for a writer that never started
            await store.create(r, first_entry(r))
    assert "not open" in str(raised.value)


async def test_close_of_a_store_that_never_opened_changes_nothing(stores: Stores) -> None:
    store = open_store(stores.url)
    await store.close()
    if stores.backend == "sqlite":
        assert not sqlite_file_exists(stores.url), "close created the file"


async def test_postgres_that_cannot_be_reached_is_store_unavailable(pg_url: str) -> None:
    _, schema = pg_parts(pg_url)
    store = open_store(f"postgresql://postgres@127.0.0.1:1/test?schema={schema}")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        await store.open()
    assert time.monotonic() - started < 2
    assert isinstance(raised.value.__cause__, OSError), repr(raised.value.__cause__)
    assert raised.value.location.startswith("postgresql://127.0.0.1")
    assert "127.0.0.1" in str(raised.value)
    with pytest.raises(StoreError):
        await store.get("x")
    await store.close()  # closing a store whose open() failed is fine


def sqlite_bad_path(tmp_path: Path, where: str) -> Path:
    if where == "missing_dir":
        return tmp_path / "no" / "such" / "dir" / "s.db"
    if where == "a_directory":
        return tmp_path
    path = tmp_path / "notes.db"
    path.write_bytes(b"my notes, not a database\n" * 200)
    return path


@pytest.mark.parametrize("where", ["missing_dir", "a_directory", "not_a_database"])
async def test_sqlite_path_that_cannot_be_opened_is_a_store_error(
    tmp_path: Path, where: str
) -> None:
    path = sqlite_bad_path(tmp_path, where)
    before = path.read_bytes() if path.is_file() else None
    store = open_store(f"sqlite:///{path}")
    with pytest.raises(StoreError) as raised:
        await store.open()
    assert isinstance(raised.value.__cause__, sqlite3.Error), repr(raised.value.__cause__)
    assert str(path) in str(raised.value)
    if where == "not_a_database":
        assert "not a sagakit database" in str(raised.value)
        assert path.read_bytes() == before, "the file was modified"
    assert not (tmp_path / "no").exists(), "no directory was created"


@pytest.mark.parametrize("where", ["missing_dir", "not_a_database"])
async def test_sqlite_close_after_a_failed_open_is_harmless(tmp_path: Path, where: str) -> None:
    store = open_store(f"sqlite:///{sqlite_bad_path(tmp_path, where)}")
    with pytest.raises(StoreError):
        await store.open()
    await store.close()  # an App or CLI cleaning up after the error must not get a 2nd one


@pytest.mark.parametrize(
    "url", ["sqlite://", "mysql://127.0.0.1/db", "postgresql://127.0.0.1/test?schema=bad-name"]
)
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_store(url)


# -- PostgreSQL only: many workers, leases, NOTIFY ---------------------------------------------


async def test_pg_concurrent_claims_never_share_a_saga(pg_stores: Stores) -> None:
    setup = await pg_stores.open()
    sagas = {(await new_saga(setup)).id for _ in range(30)}
    workers = [await pg_stores.worker() for _ in range(3)]
    claims = await asyncio.gather(*(w.claim(30) for w in workers for _ in range(2)))
    ids = [c.record.id for batch in claims for c in batch]
    assert sorted(ids) == sorted(sagas), "every saga was taken exactly once"
    for w_index, w in enumerate(workers):
        for c in claims[2 * w_index] + claims[2 * w_index + 1]:
            assert c.record.owner == w.worker_id


async def test_pg_worker_whose_lease_expired_loses_its_sagas(pg_stores: Stores) -> None:
    paused = await pg_stores.worker(lease=1.0)
    r = await new_saga(paused, owner=paused.worker_id)
    # Pause the worker: its heartbeat stops, but it keeps a live connection (ours stands in
    # for it), so only the lease can tell that it is gone.
    beat = paused._beat_task  # type: ignore[attr-defined]
    beat.cancel()
    await asyncio.gather(beat, return_exceptions=True)
    async with pg_conn(pg_stores.url) as conn:
        await conn.execute(
            "UPDATE sagakit_workers SET backend_pid = pg_backend_pid() WHERE id = $1",
            paused.worker_id,
        )
        rival = await pg_stores.worker()
        assert await rival.claim(10) == [], "the lease still runs"
        started = time.monotonic()
        (c,) = await eventually(lambda: rival.claim(10), timeout=2.5)
        assert time.monotonic() - started > 0.3
        assert await conn.fetchval(
            "SELECT lease_until < now() FROM sagakit_workers WHERE id = $1", paused.worker_id
        )
    assert (c.record.id, c.record.owner, c.record.recoveries) == (r.id, rival.worker_id, 1)

    # The paused worker wakes up and writes: it is fenced out and writes nothing.
    with pytest.raises(FencedOut):
        await paused.append(r.id, [Journal(r).new(Kind.STEP_STARTED, seq=0, step="a")])
    assert await rival.journal(r.id) == [first_entry(r)]


async def test_pg_worker_whose_connection_is_gone_for_good_is_dead_soon(
    pg_stores: Stores,
) -> None:
    """A worker process that dies loses its connection and never registers another one: it is
    dead within a fraction of a second, not after its 30 s lease."""
    victim = await pg_stores.worker(lease=30.0)
    r = await new_saga(victim, owner=victim.worker_id)
    pid = await wait_registered(pg_stores.url, victim.worker_id)
    rival = await pg_stores.worker()
    assert await rival.claim(10) == []
    # What a SIGKILL does to the worker's side: the heartbeat (and its connection) end.
    beat = victim._beat_task
    assert beat is not None
    beat.cancel()
    await asyncio.gather(beat, return_exceptions=True)
    async with pg_conn(pg_stores.url) as conn:
        await eventually(
            lambda: _gone(conn, pid), timeout=2.0
        )  # PostgreSQL noticed the closed connection
    started = time.monotonic()
    (c,) = await eventually(lambda: rival.claim(10), timeout=3.0)
    assert time.monotonic() - started < 3.0, "no need to wait for the 30 s lease"
    assert (c.record.id, c.record.owner, c.record.recoveries) == (r.id, rival.worker_id, 1)
    with pytest.raises(FencedOut):
        await victim.append(r.id, [Journal(r).new(Kind.STEP_STARTED, seq=0, step="a")])
    assert await rival.journal(r.id) == [first_entry(r)]


async def _gone(conn: Any, pid: int) -> bool:
    return not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)


async def test_pg_worker_whose_connection_was_cut_reconnects_and_keeps_its_sagas(
    pg_stores: Stores,
) -> None:
    """pg_terminate_backend of a live worker's connection is no death: it reconnects at once
    and registers the new connection, so no other worker takes its sagas."""
    victim = await pg_stores.worker(lease=30.0)
    r = await new_saga(victim, owner=victim.worker_id)
    pid = await wait_registered(pg_stores.url, victim.worker_id)
    rival = await pg_stores.worker()
    async with pg_conn(pg_stores.url) as conn:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        for _ in range(15):  # 1.5 s: three times the grace a gone connection gets
            assert await rival.claim(10) == []
            await asyncio.sleep(0.1)
        new_pid = await conn.fetchval(
            "SELECT backend_pid FROM sagakit_workers WHERE id = $1", victim.worker_id
        )
    assert new_pid not in (None, pid)
    assert (await victim.get(r.id)).owner == victim.worker_id  # type: ignore[union-attr]


async def test_pg_workers_are_woken_by_notify(pg_stores: Stores) -> None:
    woken = asyncio.Event()
    worker = await pg_stores.worker(wake=woken.set)
    client = await pg_stores.open()
    await asyncio.sleep(0.05)
    woken.clear()  # the heartbeat's own catch-up wake

    r = await new_saga(client)  # unowned: a worker should claim it
    await asyncio.wait_for(woken.wait(), 1.0)
    woken.clear()
    await new_saga(client, owner=worker.worker_id)  # owned by its starter: no wake-up needed
    await move_to(client, r.id, Kind.SAGA_PARKED)  # an operator action released a saga
    await asyncio.wait_for(woken.wait(), 1.0)


async def test_pg_close_of_a_worker_does_not_keep_it_alive(pg_stores: Stores) -> None:
    """A worker store closed without stop_worker (the process ends) must not go on
    heartbeating: its sagas become claimable, as on SQLite where close drops the lock."""
    gone = await pg_stores.worker(lease=30.0)
    r = await new_saga(gone, owner=gone.worker_id)
    await gone.close()
    rival = await pg_stores.worker()
    (c,) = await eventually(lambda: rival.claim(10), timeout=1.0)
    assert c.record.id == r.id
    beat = getattr(gone, "_beat_task", None)
    assert beat is None or beat.done(), "the closed store's heartbeat still runs"
