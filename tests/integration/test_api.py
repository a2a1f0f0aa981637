"""The REST API of ``sagakit serve`` over httpx's ASGI transport, on a real SQLite App."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from dashboard_helpers import TOKEN, broken, release, reserve

from sagakit import App, ConfigurationError, Saga, SagaState, step
from sagakit.api import create_api

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def register(app: App) -> None:
    app.register(Saga("Order", steps=[step("reserve", reserve, compensate=release)]))
    app.register(broken())

    @app.saga("Approval")
    async def approval(ctx: Any, data: Any) -> Any:
        return await ctx.wait_for_signal("decision")


@pytest.fixture
async def client(app: App) -> AsyncIterator[httpx.AsyncClient]:
    register(app)
    transport = httpx.ASGITransport(app=create_api(app, token=TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def settled(app: App, saga_id: str) -> SagaState:
    return (await app.wait(saga_id)).state


async def waiting_for_signal(app: App, saga_id: str) -> None:
    async with asyncio.timeout(5):
        while not (await app.get(saga_id)).waiting:
            await asyncio.sleep(0.02)


# -- auth -------------------------------------------------------------------------------------


def _concrete(path: str) -> str:
    return path.replace("{saga_id}", "no-such-saga").replace("{saga_type}", "Order")


async def test_every_route_refuses_a_missing_or_wrong_token(
    app: App, client: httpx.AsyncClient
) -> None:
    paths = create_api(app, token=TOKEN).openapi()["paths"]
    operations = [(m.upper(), p) for p, ops in paths.items() for m in ops]
    assert len(operations) >= 11
    wrong = [
        {},
        {"Authorization": "Bearer not-the-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer "},
    ]
    for method, path in [*operations, ("GET", "/openapi.json"), ("GET", "/nowhere")]:
        for headers in wrong:
            r = await client.request(method, _concrete(path), headers=headers, content=b"{bad")
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer"
            assert r.json()["error"] == "Unauthorized"
    assert await app.list() == []


async def test_the_openapi_document_is_served_with_the_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json", headers=AUTH)
    assert r.status_code == 200
    doc = r.json()
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert doc["security"] == [{"bearerAuth": []}]
    assert {"/api/sagas", "/api/sagas/{saga_id}/timeline", "/api/definitions"} <= set(doc["paths"])
    assert "/openapi.json" not in doc["paths"]


def test_an_empty_token_is_refused(app: App) -> None:
    blank = "  "
    with pytest.raises(ConfigurationError, match="token is empty"):
        create_api(app, token=blank)


# -- sagas ------------------------------------------------------------------------------------


async def test_start_then_get_and_an_idempotent_repeat(app: App, client: httpx.AsyncClient) -> None:
    body = {"type": "Order", "data": {"sku": "BOOK"}, "idempotency_key": "A-1"}
    r = await client.post("/api/sagas", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    started = r.json()
    assert started["created"] is True
    assert started["saga_type"] == "Order"
    assert started["input"] == {"sku": "BOOK"}
    assert await settled(app, started["id"]) is SagaState.COMPLETED

    again = await client.post("/api/sagas", json=body, headers=AUTH)
    assert again.status_code == 200
    assert again.json()["id"] == started["id"]
    assert again.json()["created"] is False

    got = (await client.get(f"/api/sagas/{started['id']}", headers=AUTH)).json()
    assert got["state"] == "completed"
    assert got["output"] == {"reserve": {"reserved": "BOOK"}}
    assert got["idempotency_key"] == "A-1"


async def test_list_filters_and_pages(app: App, client: httpx.AsyncClient) -> None:
    ids = []
    for n in range(5):
        r = await client.post(
            "/api/sagas",
            json={"type": "Order", "data": {"sku": f"S{n}"}, "idempotency_key": f"k{n}"},
            headers=AUTH,
        )
        ids.append(r.json()["id"])
    broken = (await client.post("/api/sagas", json={"type": "Broken", "data": {"sku": "X"}},
                                headers=AUTH)).json()["id"]  # fmt: skip
    for saga_id in [*ids, broken]:
        await settled(app, saga_id)

    async def listed(**params: Any) -> dict[str, Any]:
        r = await client.get("/api/sagas", params=params, headers=AUTH)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    everything = await listed()
    assert [s["id"] for s in everything["items"]] == [broken, *reversed(ids)]
    assert everything["next_offset"] is None

    first = await listed(type="Order", limit=2)
    second = await listed(type="Order", limit=2, offset=first["next_offset"])
    third = await listed(type="Order", limit=2, offset=second["next_offset"])
    pages = [first, second, third]
    assert [s["id"] for p in pages for s in p["items"]] == list(reversed(ids))
    assert [p["next_offset"] for p in pages] == [2, 4, None]
    assert [s["id"] for s in (await listed(state="needs_attention"))["items"]] == [broken]
    assert (await listed(state="completed", type="Broken"))["items"] == []
    assert [s["id"] for s in (await listed(id=ids[2]))["items"]] == [ids[2]]
    assert (await listed(id=ids[2], type="Broken"))["items"] == []
    assert (await listed(id="no-such-saga"))["items"] == []
    assert [s["id"] for s in (await listed(idempotency_key="k3"))["items"]] == [ids[3]]
    assert (await listed(idempotency_key="nope"))["items"] == []

    future = (datetime.now().astimezone() + timedelta(hours=1)).isoformat()
    assert (await listed(created_since=future))["items"] == []
    past = (datetime.now().astimezone() - timedelta(hours=1)).isoformat()
    assert len((await listed(created_since=past))["items"]) == 6
    newest = (await app.get(broken)).created_at.isoformat()
    assert [s["id"] for s in (await listed(created_since=newest))["items"]] == [broken]


async def test_timeline_is_the_journal(app: App, client: httpx.AsyncClient) -> None:
    started = (await client.post("/api/sagas", json={"type": "Order", "data": {"sku": "B"}},
                                 headers=AUTH)).json()  # fmt: skip
    await settled(app, started["id"])
    r = await client.get(f"/api/sagas/{started['id']}/timeline", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["state"] == "completed"
    kinds = [e["kind"] for e in body["journal"]]
    assert kinds[0] == "saga_started"
    assert kinds[-1] == "saga_completed"
    assert len(body["journal"]) == len(await app.journal(started["id"]))
    assert [e["index"] for e in body["journal"]] == list(range(len(kinds)))
    step_rows = [row for row in body["rows"] if row["what"] == "reserve"]
    assert [(row["attempt"], row["outcome"]) for row in step_rows] == [(1, "completed")]


async def test_signal_then_cancel(app: App, client: httpx.AsyncClient) -> None:
    first = (await client.post("/api/sagas", json={"type": "Approval"}, headers=AUTH)).json()
    await waiting_for_signal(app, first["id"])
    signal = {"name": "decision", "payload": {"approve": True}, "signal_id": "d-1"}
    r = await client.post(f"/api/sagas/{first['id']}/signals", json=signal, headers=AUTH)
    assert r.status_code == 202, r.text
    assert r.json() == {"saga_id": first["id"], "name": "decision", "sent": True}
    assert await settled(app, first["id"]) is SagaState.COMPLETED
    assert (await app.get(first["id"])).output == {"approve": True}

    second = (await client.post("/api/sagas", json={"type": "Approval"}, headers=AUTH)).json()
    await waiting_for_signal(app, second["id"])
    r = await client.post(
        f"/api/sagas/{second['id']}/cancel", json={"reason": "changed mind"}, headers=AUTH
    )
    assert r.status_code == 202, r.text
    assert await settled(app, second["id"]) is SagaState.CANCELLED

    ended = await client.post(f"/api/sagas/{second['id']}/signals", json=signal, headers=AUTH)
    assert ended.status_code == 409
    assert ended.json()["error"] == "InvalidSagaState"


async def test_retry_and_resolve_a_saga_that_needs_attention(
    app: App, client: httpx.AsyncClient
) -> None:
    ids = []
    for _ in range(2):
        r = await client.post("/api/sagas", json={"type": "Broken", "data": {"sku": "X"}},
                              headers=AUTH)  # fmt: skip
        ids.append(r.json()["id"])
        assert await settled(app, ids[-1]) is SagaState.NEEDS_ATTENTION

    retried = await client.post(f"/api/sagas/{ids[0]}/retry", headers=AUTH)
    assert retried.status_code == 202, retried.text
    assert await settled(app, ids[0]) is SagaState.NEEDS_ATTENTION  # the undo is still broken
    kinds = [e.kind.value for e in await app.journal(ids[0])]
    assert "operator_retry" in kinds

    blank = await client.post(f"/api/sagas/{ids[1]}/resolve", json={"note": " "}, headers=AUTH)
    assert blank.status_code == 422
    resolved = await client.post(
        f"/api/sagas/{ids[1]}/resolve", json={"note": "released by hand"}, headers=AUTH
    )
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["state"] == "failed"

    again = await client.post(f"/api/sagas/{ids[1]}/retry", headers=AUTH)
    assert again.status_code == 409
    assert "needs_attention" in again.json()["detail"]


# -- definitions ------------------------------------------------------------------------------


async def test_definitions_and_graphs(app: App, client: httpx.AsyncClient) -> None:
    r = await client.get("/api/definitions", headers=AUTH)
    assert r.status_code == 200
    by_type = {d["type"]: d for d in r.json()}
    assert set(by_type) == {"Approval", "Broken", "Order"}
    assert by_type["Broken"]["steps"] == ["reserve", "charge"]
    assert by_type["Broken"]["kind"] == "declarative"
    assert by_type["Approval"]["kind"] == "code-first"

    one = await client.get("/api/definitions/Order", headers=AUTH)
    assert one.json()["version"] == 1

    graph = await client.get("/api/definitions/Broken/graph", headers=AUTH)
    assert graph.status_code == 200
    assert graph.json()["mermaid"].startswith("flowchart TD")
    assert '"undo reserve"' in graph.json()["mermaid"]

    no_runs = await client.get("/api/definitions/Approval/graph", headers=AUTH)
    assert no_runs.status_code == 409
    assert "run one first" in no_runs.json()["detail"]
    no_version = await client.get("/api/definitions/Order/graph?version=7", headers=AUTH)
    assert no_version.status_code == 404


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/sagas/{id}"),
        ("GET", "/api/sagas/{id}/timeline"),
        ("POST", "/api/sagas/{id}/cancel"),
        ("POST", "/api/sagas/{id}/retry"),
        ("GET", "/api/definitions/Nope"),
        ("GET", "/api/definitions/Nope/graph"),
    ],
)
async def test_unknown_ids_are_404(client: httpx.AsyncClient, method: str, path: str) -> None:
    r = await client.request(method, path.format(id="no-such-saga"), headers=AUTH)
    assert r.status_code == 404, r.text
    assert r.json()["error"] in {"SagaNotFound", "UnknownSagaType"}
    assert "no-such-saga" in r.json()["detail"] or "Nope" in r.json()["detail"]


async def test_unknown_ids_are_404_for_signal_and_resolve(client: httpx.AsyncClient) -> None:
    signal = await client.post("/api/sagas/x/signals", json={"name": "go"}, headers=AUTH)
    resolve = await client.post("/api/sagas/x/resolve", json={"note": "done"}, headers=AUTH)
    assert (signal.status_code, resolve.status_code) == (404, 404)


@pytest.mark.parametrize(
    "body",
    [
        {"type": "Nope", "data": {}},
        {"data": {"sku": "B"}},
        {"type": "Order", "idempotency_key": 7},
        {"type": "Order", "idempotency_key": ""},
        {"type": "Order", "deadline": -1},
        {"type": "Order", "typo": 1},
        [],
        "not an object",
    ],
)
async def test_bad_starts_are_422_and_write_nothing(
    app: App, client: httpx.AsyncClient, body: Any
) -> None:
    r = await client.post("/api/sagas", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"error", "detail"}
    assert r.json()["detail"]
    assert await app.list() == []


async def test_malformed_json_and_bad_queries_are_422(app: App, client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/api/sagas", content=b"{nope", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status_code == 422
    assert r.json()["error"] == "InvalidRequest"
    for params in ({"state": "sleeping"}, {"limit": 0}, {"offset": -1}, {"created_since": "x"}):
        bad = await client.get("/api/sagas", params=params, headers=AUTH)
        assert bad.status_code == 422, params
    bad_signal = await client.post("/api/sagas/x/signals", json={"name": ""}, headers=AUTH)
    assert bad_signal.status_code == 422
    assert await app.list() == []


async def test_metrics_are_scraped_after_a_run(tmp_path: Any) -> None:
    """GET /metrics (behind the token) shows the run's steps and the store's figures."""
    from sagakit.observability import Metrics

    async def reserve(ctx: object, data: object) -> str:
        return "r"

    metrics = Metrics()
    app = App(f"sqlite:///{tmp_path / 'm.db'}", poll_interval=0.05, middleware=[metrics])
    app.register(Saga("Metered", steps=[step("reserve", reserve)]))
    async with app:
        await (await app.start("Metered", None)).result(timeout=5)
        api = create_api(app, token=TOKEN, metrics=metrics)
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            assert (await client.get("/metrics")).status_code == 401
            scraped = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert scraped.status_code == 200
    text = scraped.text
    labels = 'outcome="completed",saga_type="Metered",step="reserve"'
    assert f"sagakit_step_duration_seconds_count{{{labels}}} 1.0" in text
    assert 'sagakit_sagas{state="completed"} 1.0' in text


# -- found by the fuzz (test_api_fuzz.py) and around it ----------------------------------------
# Each input below got a 5xx, or was written and then answered with an error, or got an answer
# the OpenAPI document does not describe. Each now gets a 422 before anything is written.


@contextlib.asynccontextmanager
async def serving(url: str) -> AsyncIterator[tuple[App, httpx.AsyncClient]]:
    """The API over an App on ``url`` (SQLite or PostgreSQL), with the test sagas registered."""
    app = App(url, poll_interval=0.02)
    register(app)
    transport = httpx.ASGITransport(app=create_api(app, token=TOKEN))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield app, c
    finally:
        await app.close()


async def stored(app: App) -> tuple[int, int, int]:
    """Sagas, journal entries and signals in the store."""
    sagas = await app.list(limit=500)
    journals = [len(await app.journal(s.id)) for s in sagas]
    signals = [len(await app.store.signals(s.id)) for s in sagas]
    return len(sagas), sum(journals), sum(signals)


def refused(r: httpx.Response) -> str:
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"error", "detail"}
    return r.json()["detail"]  # type: ignore[no-any-return]


async def test_the_document_describes_the_errors_and_the_repeated_start(
    client: httpx.AsyncClient,
) -> None:
    """FastAPI documented every 422 as a list of pydantic errors, and a start with a used
    idempotency key (200) not at all; the answers are an ErrorOut and a StartOut."""
    doc = (await client.get("/openapi.json", headers=AUTH)).json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    documented_422 = 0
    for operations in doc["paths"].values():
        for operation in operations.values():
            if "422" in operation["responses"]:
                content = operation["responses"]["422"]["content"]
                assert content["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
                documented_422 += 1
    assert documented_422 >= 10
    start = doc["paths"]["/api/sagas"]["post"]["responses"]
    for code in ("200", "201"):
        assert start[code]["content"]["application/json"]["schema"]["$ref"].endswith("/StartOut")


@pytest.mark.parametrize("deadline", [2.6e11, 1e300])
async def test_a_deadline_no_date_can_hold_is_422(
    app: App, client: httpx.AsyncClient, deadline: float
) -> None:
    """It was stored, then the answer (and every later list) failed: year 10000."""
    body = {"type": "Order", "deadline": deadline}
    r = await client.post("/api/sagas", json=body, headers=AUTH)
    assert "less than or equal to" in refused(r)
    assert await app.list() == []
    century = await client.post("/api/sagas", json={**body, "deadline": 3.1e9}, headers=AUTH)
    assert century.status_code == 201, century.text
    assert datetime.fromisoformat(century.json()["deadline"]).year > 2100


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": "\xff"}',  # not UTF-8
        b'{"type": "Order", "data": ' + b"9" * 5000 + b"}",  # an int Python will not parse
        b"[" * 100_000 + b"]" * 100_000,  # deeper than json.loads goes
    ],
)
async def test_a_body_that_json_cannot_read_is_422_not_400(
    app: App, client: httpx.AsyncClient, body: bytes
) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    r = await client.post("/api/sagas", content=body, headers=headers)
    assert refused(r).startswith("the body is not JSON that can be read")
    assert r.json()["error"] == "InvalidRequest"
    assert await app.list() == []


async def test_an_offset_past_64_bits_is_422(any_url: str) -> None:
    """SQLite raised OverflowError and PostgreSQL a DataError for an offset of 2**63."""
    async with serving(any_url) as (_, client):
        r = await client.get("/api/sagas", params={"offset": 2**63}, headers=AUTH)
        assert "offset" in refused(r)
        far = await client.get("/api/sagas", params={"offset": 10**18}, headers=AUTH)
        assert far.status_code == 200, far.text
        assert far.json()["items"] == []


@pytest.mark.parametrize(
    ("since", "everything"),
    [
        ("0001-01-01T00:00:00", True),  # naive: the server's zone has no rules for year 1
        ("0001-01-01T00:00:00+00:01", True),  # converted to the server's zone: year 0
        ("9999-12-31T23:59:59", False),
        ("9999-12-31T23:59:59-23:59", False),
    ],
)
async def test_created_since_at_the_ends_of_time(
    app: App, client: httpx.AsyncClient, since: str, everything: bool
) -> None:
    r = await client.post("/api/sagas", json={"type": "Order", "data": {"sku": "B"}}, headers=AUTH)
    listed = await client.get("/api/sagas", params={"created_since": since}, headers=AUTH)
    assert listed.status_code == 200, listed.text
    expected = [r.json()["id"]] if everything else []
    assert [s["id"] for s in listed.json()["items"]] == expected


async def test_json_nested_deeper_than_a_response_can_carry_is_422(
    app: App, client: httpx.AsyncClient
) -> None:
    """300 levels were stored, then no answer about the saga could be serialised."""
    deep: Any = []
    for _ in range(299):
        deep = [deep]
    r = await client.post("/api/sagas", json={"type": "Order", "data": deep}, headers=AUTH)
    assert "nested more than 64 levels" in refused(r)
    assert await app.list() == []
    ok: Any = {"sku": "B"}
    for _ in range(63):
        ok = [ok]
    started = await client.post("/api/sagas", json={"type": "Order", "data": ok}, headers=AUTH)
    assert started.status_code == 201, started.text
    got = await client.get(f"/api/sagas/{started.json()['id']}", headers=AUTH)
    assert got.json()["input"] == ok


async def _targets(app: App, client: httpx.AsyncClient) -> tuple[str, str]:
    """A saga waiting for a signal and one that needs attention."""
    waiting = (await client.post("/api/sagas", json={"type": "Approval"}, headers=AUTH)).json()
    broken = (await client.post("/api/sagas", json={"type": "Broken", "data": {"sku": "X"}},
                                headers=AUTH)).json()  # fmt: skip
    await waiting_for_signal(app, waiting["id"])
    assert await settled(app, broken["id"]) is SagaState.NEEDS_ATTENTION
    return waiting["id"], broken["id"]


# Raw bodies: a JSON "\ud800" escape is an unpaired surrogate, which no database stores.
SURROGATE = "\\ud800"


async def test_strings_that_are_not_unicode_are_422(any_url: str) -> None:
    """A surrogate in data, payload, reason or note was a 500 on both databases."""
    async with serving(any_url) as (app, client):
        waiting, broken = await _targets(app, client)
        before = await stored(app)
        headers = {**AUTH, "Content-Type": "application/json"}
        requests = [
            ("/api/sagas", f'{{"type": "Order", "data": {{"sku": "{SURROGATE}"}}}}'),
            ("/api/sagas", f'{{"type": "Order", "data": {{"{SURROGATE}": 1}}}}'),
            ("/api/sagas", f'{{"type": "Order", "idempotency_key": "{SURROGATE}"}}'),
            (f"/api/sagas/{waiting}/signals", f'{{"name": "go", "payload": "{SURROGATE}"}}'),
            (f"/api/sagas/{waiting}/signals", f'{{"name": "go", "signal_id": "{SURROGATE}"}}'),
            (f"/api/sagas/{waiting}/cancel", f'{{"reason": "{SURROGATE}"}}'),
            (f"/api/sagas/{broken}/resolve", f'{{"note": "{SURROGATE}"}}'),
        ]
        for path, body in requests:
            r = await client.post(path, content=body.encode(), headers=headers)
            assert "Unicode" in refused(r) or "unicode" in refused(r), (path, body)
        assert await stored(app) == before


async def test_nul_characters_in_keys_and_names_are_422(any_url: str) -> None:
    """PostgreSQL cannot store NUL in text: these were 500s there (and stored on SQLite)."""
    async with serving(any_url) as (app, client):
        waiting, _ = await _targets(app, client)
        before = await stored(app)
        posts = [
            ("/api/sagas", {"type": "Order", "idempotency_key": "a\x00b"}),
            (f"/api/sagas/{waiting}/signals", {"name": "go\x00"}),
            (f"/api/sagas/{waiting}/signals", {"name": "go", "signal_id": "\x00"}),
        ]
        for path, body in posts:
            assert "NUL" in refused(await client.post(path, json=body, headers=AUTH)), body
        for query in ({"idempotency_key": "\x00"}, {"id": "\x00"}, {"type": "\x00"}):
            r = await client.get("/api/sagas", params=query, headers=AUTH)
            assert "NUL" in refused(r), query
        for path in ("/api/sagas/%00", "/api/sagas/%00/timeline", "/api/sagas/%00/retry"):
            r = await client.request("POST" if "retry" in path else "GET", path, headers=AUTH)
            assert "NUL" in refused(r), path
        assert await stored(app) == before
        # In JSON values a NUL is written escaped, so it is stored and read back as sent.
        body = {"type": "Order", "data": {"sku": "a\x00b"}}
        started = await client.post("/api/sagas", json=body, headers=AUTH)
        assert started.status_code == 201, started.text
        assert (await app.get(started.json()["id"])).input == {"sku": "a\x00b"}
