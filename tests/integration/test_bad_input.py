"""Bad input to the Python API is refused with a clear error before anything is written, on
SQLite and PostgreSQL alike: text a database cannot store (NUL, unpaired surrogates), deadlines
that could not be read back, ids that cannot exist."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from sagakit import App, ConfigurationError, NotSerializable, SagaNotFound, SagaState

NUL = "a\x00b"
SURROGATE = "a\ud800b"


@pytest.fixture
async def client(any_url: str) -> AsyncIterator[App]:
    """An App that starts and operates sagas but never executes them (they stay put)."""
    app = App(any_url, worker=False)

    @app.saga("Waiter")
    async def waiter(ctx: Any, data: Any) -> Any:
        return await ctx.wait_for_signal("go")

    async with app:
        yield app


async def _written(app: App) -> tuple[int, int, int]:
    """(sagas, journal entries, signals) in the store."""
    infos = await app.list(limit=1000)
    entries = sum([len(await app.journal(i.id)) for i in infos])
    signals = sum([len(await app.store.signals(i.id)) for i in infos])
    return len(infos), entries, signals


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"data": {"note": SURROGATE}}, "unpaired surrogate", id="surrogate-data"),
        pytest.param({"data": {SURROGATE: 1}}, "unpaired surrogate", id="surrogate-key"),
        pytest.param({"idempotency_key": NUL}, "NUL", id="nul-key"),
        pytest.param({"idempotency_key": SURROGATE}, "unpaired surrogate", id="surrogate-key"),
        pytest.param({"idempotency_key": ""}, "non-empty", id="empty-key"),
        pytest.param({"deadline": 0}, "deadline", id="zero-deadline"),
        pytest.param({"deadline": -5}, "deadline", id="negative-deadline"),
        pytest.param({"deadline": float("nan")}, "deadline", id="nan-deadline"),
        pytest.param({"deadline": float("inf")}, "deadline", id="inf-deadline"),
        pytest.param({"deadline": 1e300}, "deadline", id="huge-deadline"),
        pytest.param({"deadline": "60"}, "deadline", id="str-deadline"),
        pytest.param({"deadline": True}, "deadline", id="bool-deadline"),
    ],
)
async def test_a_start_with_bad_input_writes_nothing(
    client: App, kwargs: dict[str, Any], message: str
) -> None:
    before = await _written(client)
    with pytest.raises((ConfigurationError, NotSerializable)) as raised:
        await client.start("Waiter", **kwargs)
    assert message in str(raised.value)
    assert await _written(client) == before
    handle = await client.start("Waiter", {"fine": True}, idempotency_key="k", deadline=3600)
    assert handle.created  # the refused start used up nothing


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda a, i: a.signal(i, NUL), "NUL", id="nul-name"),
        pytest.param(lambda a, i: a.signal(i, "go", signal_id=NUL), "NUL", id="nul-signal-id"),
        pytest.param(lambda a, i: a.signal(i, "go", {"x": SURROGATE}), "surrogate", id="payload"),
        pytest.param(lambda a, i: a.cancel(i, reason=NUL), "NUL", id="nul-reason"),
        pytest.param(lambda a, i: a.cancel(i, reason=SURROGATE), "surrogate", id="bad-reason"),
    ],
)
async def test_operations_with_bad_input_write_nothing(
    client: App, call: Any, message: str
) -> None:
    handle = await client.start("Waiter", {})
    before = await _written(client)
    with pytest.raises((ConfigurationError, NotSerializable)) as raised:
        await call(client, handle.id)
    assert message in str(raised.value)
    assert await _written(client) == before
    assert (await client.get(handle.id)).state is SagaState.STARTED


async def test_a_resolve_note_with_nul_is_refused(client: App) -> None:
    with pytest.raises(ConfigurationError, match="NUL"):
        await client.resolve("any-id", NUL)


async def test_ids_and_filters_that_cannot_exist(client: App) -> None:
    await client.start("Waiter", {})
    for bad in (NUL, SURROGATE):
        with pytest.raises(SagaNotFound):
            await client.get(bad)
        with pytest.raises(SagaNotFound):
            await client.journal(bad)
        assert await client.list(saga_type=bad) == []
    assert len(await client.list(saga_type="Waiter")) == 1
