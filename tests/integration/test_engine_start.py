"""Starting sagas on a real SQLite file: idempotent start, bad input that changes nothing,
database ownership, the synchronous facade and durability settings."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from sagakit import (
    App,
    ConfigurationError,
    DatabaseOwned,
    Kind,
    NotSerializable,
    RetryPolicy,
    Saga,
    SagaFailed,
    SagaNotFound,
    SagaState,
    SchemaTooNew,
    StoreError,
    SyncApp,
    UnknownSagaType,
    step,
)
from sagakit.store.sqlite import migrations


def db_path(db_url: str) -> Path:
    return Path(db_url.removeprefix("sqlite:///"))


def row_counts(db_url: str) -> tuple[int, int]:
    """(sagas, journal entries) read straight from the file."""
    with sqlite3.connect(db_path(db_url)) as conn:
        sagas = conn.execute("SELECT count(*) FROM sagakit_sagas").fetchone()[0]
        entries = conn.execute("SELECT count(*) FROM sagakit_journal").fetchone()[0]
    conn.close()
    return sagas, entries


def counting_saga(calls: Any, name: str = "Counted") -> Saga:
    async def work(ctx: Any, data: Any) -> Any:
        calls.add(ctx.step, data=data, saga_id=ctx.saga_id)
        await asyncio.sleep(0.001)
        return data

    return Saga(name, steps=[step("one", work), step("two", work)])


COUNTED_JOURNAL = [
    Kind.SAGA_STARTED,
    Kind.STEP_STARTED,
    Kind.STEP_COMPLETED,
    Kind.STEP_STARTED,
    Kind.STEP_COMPLETED,
    Kind.SAGA_COMPLETED,
]


async def assert_counted_completed(app: App, check: Any, saga_id: str, data: Any) -> None:
    """A Counted saga ran each step once and completed; its row is its journal's projection."""
    c = await check(app, saga_id)
    assert c.kinds() == COUNTED_JOURNAL
    assert c.info.state is SagaState.COMPLETED
    assert c.info.input == data
    assert c.info.output == {"one": data, "two": data}


# -- 6. idempotent start -----------------------------------------------------------------------


async def test_concurrent_starts_with_one_key_make_one_saga(
    app: App, calls: Any, check: Any
) -> None:
    app.register(counting_saga(calls))
    handles = await asyncio.gather(
        *(app.start("Counted", {"n": i}, idempotency_key="k1") for i in range(50))
    )

    assert len({h.id for h in handles}) == 1
    created = [i for i, h in enumerate(handles) if h.created]
    assert len(created) == 1
    await handles[0].result(timeout=5)
    sagas = await app.list()
    assert len(sagas) == 1
    (info,) = sagas
    assert info.id == handles[0].id
    assert info.idempotency_key == "k1"
    assert info.input == {"n": created[0]}, "the saga runs with the input of the start that won"
    assert calls.names() == ["one", "two"], "the steps ran once"
    c = await check(app, info.id)
    assert c.info.state is SagaState.COMPLETED
    assert len(c.of(Kind.SAGA_STARTED)) == 1
    assert len(c.of(Kind.SAGA_COMPLETED)) == 1

    again = await app.start("Counted", {"n": "late"}, idempotency_key="k1")
    assert (again.id, again.created) == (info.id, False)
    assert await again.result(timeout=5) == {"one": {"n": created[0]}, "two": {"n": created[0]}}
    assert calls.names() == ["one", "two"]
    assert row_counts(app.store.location) == (1, len(c.entries))


async def test_different_keys_and_no_key_make_separate_sagas(
    app: App, calls: Any, check: Any
) -> None:
    app.register(counting_saga(calls))
    a = await app.start("Counted", 1, idempotency_key="a")
    b = await app.start("Counted", 2, idempotency_key="b")
    n1 = await app.start("Counted", 3)
    n2 = await app.start("Counted", 3)
    assert all(h.created for h in (a, b, n1, n2))
    assert len({a.id, b.id, n1.id, n2.id}) == 4
    for h, data in ((a, 1), (b, 2), (n1, 3), (n2, 3)):
        await h.result(timeout=5)
        await assert_counted_completed(app, check, h.id, data)
    listed = await app.list(state="completed")
    assert [i.id for i in listed] == [n2.id, n1.id, b.id, a.id], "newest first"
    assert [i.idempotency_key for i in listed] == [None, None, "b", "a"]
    with pytest.raises(ConfigurationError):
        await app.start("Counted", 1, idempotency_key=42)  # type: ignore[arg-type]


async def test_one_key_from_an_owner_and_a_client_at_once_makes_one_saga(
    app: App, db_url: str, calls: Any, check: Any
) -> None:
    app.register(counting_saga(calls))
    await app.open()
    client = App(db_url, worker=False)
    try:
        client.register(counting_saga(calls))
        handles = await asyncio.gather(
            *(
                a.start("Counted", i, idempotency_key="shared")
                for i in range(10)
                for a in (app, client)
            )
        )
        assert len({h.id for h in handles}) == 1
        (winner,) = [i for i, h in enumerate(handles) if h.created]
        await handles[0].result(timeout=5)
        assert len(await client.list()) == 1
        await assert_counted_completed(client, check, handles[0].id, winner // 2)
        assert calls.names() == ["one", "two"]
    finally:
        await client.close()


# -- 11. bad input -----------------------------------------------------------------------------


async def test_unknown_saga_type_raises_before_anything_is_written(db_url: str, calls: Any) -> None:
    app = App(db_url, poll_interval=0.05)
    try:
        app.register(counting_saga(calls))
        with pytest.raises(UnknownSagaType) as raised:
            await app.start("Nope", {"x": 1})
        assert raised.value.saga_type == "Nope"
        assert raised.value.known == ["Counted"]
        assert "Counted" in str(raised.value)
        assert not db_path(db_url).exists(), "an unknown type must not even create the file"
        assert await app.list() == []
        assert row_counts(db_url) == (0, 0)
    finally:
        await app.close()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"x": object()}, id="object"),
        pytest.param({"s": {1, 2}}, id="set"),
        pytest.param({"f": float("nan")}, id="nan"),
        pytest.param(lambda: None, id="function"),
    ],
)
async def test_unserialisable_input_raises_and_writes_nothing(
    app: App, calls: Any, check: Any, payload: Any
) -> None:
    app.register(counting_saga(calls))
    await app.open()
    with pytest.raises(NotSerializable) as raised:
        await app.start("Counted", payload, idempotency_key="k")
    assert "the input of saga 'Counted'" in str(raised.value)
    assert await app.list() == []
    assert row_counts(app.store.location) == (0, 0)
    # The key was not used up by the refused start.
    handle = await app.start("Counted", {"ok": True}, idempotency_key="k")
    assert handle.created
    await handle.result(timeout=5)
    assert calls.names() == ["one", "two"]
    await assert_counted_completed(app, check, handle.id, {"ok": True})


async def test_step_result_that_cannot_be_stored_fails_the_step(
    app: App, calls: Any, check: Any
) -> None:
    async def fine(ctx: Any, data: Any) -> str:
        return "fine"

    async def undo(ctx: Any, data: Any, result: Any) -> None:
        calls.add("undo", result=result)

    async def bad_result(ctx: Any, data: Any) -> Any:
        calls.add("bad", attempt=ctx.attempt)
        return {"conn": object()}

    retry = RetryPolicy(max_attempts=3, initial_interval=0.001)
    app.register(
        Saga(
            "BadResult",
            steps=[step("fine", fine, compensate=undo), step("bad", bad_result, retry=retry)],
        )
    )
    handle = await app.start("BadResult")
    with pytest.raises(SagaFailed) as raised:
        await handle.result(timeout=5)
    assert raised.value.state is SagaState.FAILED
    assert calls.of("bad") == [{"attempt": 1}], "retrying cannot make a result serialisable"
    assert calls.of("undo") == [{"result": "fine"}]
    c = await check(app, handle.id)
    (failed,) = c.of(Kind.STEP_FAILED)
    assert failed.error is not None
    assert failed.error["type"] == "NotSerializable"
    assert "the result of step 'bad'" in failed.error["message"]

    # The process is fine: the next saga runs normally.
    app.register(counting_saga(calls))
    assert await (await app.start("Counted", 5)).result(timeout=5) == {"one": 5, "two": 5}


async def test_lookups_of_unknown_ids_and_states(app: App) -> None:
    with pytest.raises(SagaNotFound) as raised:
        await app.get("missing")
    assert raised.value.saga_id == "missing"
    with pytest.raises(SagaNotFound):
        await app.journal("missing")
    with pytest.raises(ConfigurationError) as bad_state:
        await app.list(state="bogus")
    assert "completed" in str(bad_state.value), "the message lists the valid states"
    assert await app.list(state="completed") == []
    assert await app.list(state=SagaState.FAILED) == []


async def test_schema_too_new_refuses_to_open_and_changes_nothing(db_url: str) -> None:
    path = db_path(db_url)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE sagakit_schema (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO sagakit_schema (version) VALUES (999)")
    conn.commit()
    conn.close()
    before = path.read_bytes()

    app = App(db_url)
    try:
        with pytest.raises(SchemaTooNew) as raised:
            await app.open()
        assert (raised.value.found, raised.value.supported) == (999, migrations()[-1][0])
        assert "upgrade sagakit" in str(raised.value)
        with pytest.raises(SchemaTooNew):
            await app.list()
    finally:
        await app.close()
    with sqlite3.connect(path) as check_conn:
        tables = {r[0] for r in check_conn.execute("SELECT name FROM sqlite_master")}
    check_conn.close()
    assert tables == {"sagakit_schema"}
    assert path.read_bytes() == before, "the database file was modified"


async def test_a_file_that_is_not_a_database_is_a_store_error(db_url: str) -> None:
    path = db_path(db_url)
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    before = path.read_bytes()
    app = App(db_url)
    try:
        with pytest.raises(StoreError) as raised:
            await app.open()
        assert str(path) in str(raised.value)
        assert raised.value.__cause__ is not None
    finally:
        await app.close()
    assert path.read_bytes() == before


async def test_second_worker_is_refused_and_a_client_hands_work_to_the_owner(
    app: App, db_url: str, calls: Any, check: Any
) -> None:
    app.register(counting_saga(calls))
    await app.open()
    assert app.executing

    rival = App(db_url, worker=True)
    with pytest.raises(DatabaseOwned) as raised:
        await rival.open()
    assert raised.value.path == str(db_path(db_url))
    assert "worker=False" in str(raised.value)
    await rival.close()

    client = App(db_url, worker=None, poll_interval=0.02)
    try:
        client.register(counting_saga(calls))
        handle = await client.start("Counted", {"from": "client"})
        assert not client.executing
        assert await handle.result(timeout=5) == {
            "one": {"from": "client"},
            "two": {"from": "client"},
        }
        assert [s["saga_id"] for s in calls.of("one")] == [handle.id]
        c = await check(client, handle.id)
        assert c.info.state is SagaState.COMPLETED
        assert (await app.get(handle.id)).state is SagaState.COMPLETED
        # Read-only clients see the owner's sagas too.
        assert [i.id for i in await client.list()] == [handle.id]
    finally:
        await client.close()


async def test_worker_false_never_executes_even_when_nobody_owns_the_file(
    db_url: str, calls: Any, check: Any
) -> None:
    reader = App(db_url, worker=False)
    try:
        reader.register(counting_saga(calls))
        handle = await reader.start("Counted", 1)
        assert not reader.executing
        await asyncio.sleep(0.1)
        waiting = await check(reader, handle.id)
        assert waiting.info.state is SagaState.STARTED
        assert waiting.kinds() == [Kind.SAGA_STARTED]
        assert calls.names() == []
        # Its lock is not held: a worker can start and runs the saga it finds.
        worker = App(db_url, worker=True, poll_interval=0.02)
        try:
            worker.register(counting_saga(calls))
            assert await worker.handle(handle.id).result(timeout=5) == {"one": 1, "two": 1}
            await assert_counted_completed(worker, check, handle.id, 1)
            await assert_counted_completed(reader, check, handle.id, 1)
        finally:
            await worker.close()
    finally:
        await reader.close()


# -- 12. the synchronous facade ----------------------------------------------------------------


def test_sync_app_from_plain_code(db_url: str, calls: Any, check: Any) -> None:
    main = threading.current_thread()

    def reserve(ctx: Any, data: Any) -> str:
        calls.add("reserve", thread=threading.current_thread())
        return f"held-{data['sku']}"

    def release(ctx: Any, data: Any, result: Any) -> None:
        calls.add("release", result=result)

    def pay(ctx: Any, data: Any) -> str:
        if data.get("fail"):
            raise RuntimeError("declined")
        return "paid"

    sapp = SyncApp(db_url, poll_interval=0.05)
    try:
        sapp.register(
            Saga(
                "SyncOrder", steps=[step("reserve", reserve, compensate=release), step("pay", pay)]
            )
        )
        ok = sapp.start("SyncOrder", {"sku": "X"}, idempotency_key="o-1")
        assert ok.created
        assert ok.result(timeout=5) == {"reserve": "held-X", "pay": "paid"}
        assert ok.status().state is SagaState.COMPLETED
        assert calls.of("reserve")[0]["thread"] is not main

        dup = sapp.start("SyncOrder", {"sku": "Y"}, idempotency_key="o-1")
        assert (dup.id, dup.created) == (ok.id, False)

        bad = sapp.start("SyncOrder", {"sku": "Z", "fail": True})
        with pytest.raises(SagaFailed) as raised:
            bad.result(timeout=5)
        assert raised.value.state is SagaState.FAILED
        assert calls.of("release") == [{"result": "held-Z"}]

        listed = sapp.list()
        assert {i.id for i in listed} == {ok.id, bad.id}
        assert [i.id for i in sapp.list(state="failed")] == [bad.id]
        assert sapp.get(ok.id).output == {"reserve": "held-X", "pay": "paid"}
        with pytest.raises(SagaNotFound):
            sapp.get("missing")
    finally:
        sapp.close()

    # Closed means closed: the data is on disk for the next process.
    with SyncApp(db_url, worker=False) as again:
        assert {i.state for i in again.list()} == {SagaState.COMPLETED, SagaState.FAILED}

    async def journals() -> tuple[Any, Any]:
        async with App(db_url, worker=False) as reader:
            return await check(reader, ok.id), await check(reader, bad.id)

    ok_c, bad_c = asyncio.run(journals())
    assert ok_c.kinds()[-1] is Kind.SAGA_COMPLETED
    assert [e.step for e in ok_c.of(Kind.STEP_COMPLETED)] == ["reserve", "pay"]
    assert bad_c.steps(Kind.STEP_FAILED, Kind.COMPENSATION_COMPLETED) == [
        (Kind.STEP_FAILED, "pay", 1),
        (Kind.COMPENSATION_COMPLETED, "reserve", 1),
    ]
    assert bad_c.kinds()[-1] is Kind.SAGA_FAILED


# -- 13. durability ----------------------------------------------------------------------------


async def test_normal_durability_runs_sagas(db_url: str, calls: Any, check: Any) -> None:
    async with App(db_url, durability="normal", poll_interval=0.05) as app:
        app.register(counting_saga(calls))
        handle = await app.start("Counted", "n")
        assert await handle.result(timeout=5) == {"one": "n", "two": "n"}
    async with App(db_url, worker=False) as reader:
        await assert_counted_completed(reader, check, handle.id, "n")


def test_bad_durability_is_a_configuration_error(db_url: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        App(db_url, durability="bogus")
    assert "'full'" in str(raised.value)
    assert "'normal'" in str(raised.value)
    assert "'bogus'" in str(raised.value)
    assert not db_path(db_url).exists()


@pytest.mark.parametrize("url", ["postgresql://x/y?schema=bad-name", "sqlite://", "mysql://db/x"])
def test_unsupported_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        App(url)
