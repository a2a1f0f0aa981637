"""The REST API fuzzed with schemathesis against its own OpenAPI document.

Every operation of ``/openapi.json`` gets generated requests, valid ones and invalid ones, all
with the bearer token. No answer may be a 5xx or disagree with the document, and an answer in
the 4xx range must leave the store exactly as it was (DESIGN principle 5: bad input changes
nothing). Part of the requests are aimed at sagas, keys and types that exist, so that the
write routes get past their 404s and 422s and really write.

The App and the ASGI app live on an event loop of their own in a background thread (an anyio
blocking portal); hypothesis drives the requests from the test's thread. That App does not
execute sagas, so the store changes only when a request writes, and a snapshot of the file
before and after each request says exactly whether it did.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_api import AUTH, TOKEN, register

from sagakit import App, SagaState
from sagakit.api import create_api

EXAMPLES = 30  # per operation and generation mode
TYPES = ["Order", "Broken", "Approval"]
WRITES = {
    "POST /api/sagas",
    "POST /api/sagas/{saga_id}/signals",
    "POST /api/sagas/{saga_id}/cancel",
    "POST /api/sagas/{saga_id}/retry",
    "POST /api/sagas/{saga_id}/resolve",
}
# Everything a request could write, change or delete, read in one query.
SNAPSHOT = """
SELECT
    (SELECT count(*) FROM sagakit_sagas),
    (SELECT count(*) FROM sagakit_journal),
    (SELECT count(*) FROM sagakit_signals),
    (SELECT count(*) FROM sagakit_outbox),
    (SELECT group_concat(row, ';') FROM (
        SELECT id || state || ifnull(owner, '-') || ifnull(wake_at, '-') || updated_at AS row
        FROM sagakit_sagas ORDER BY id))
"""
# Schemathesis's cases are large: on a busy 2-core machine their generation can be slow by
# hypothesis's measure, which says nothing about the API. (No other health check fires.)
TOLERATED = [HealthCheck.too_slow]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Sagas:
    """The sagas made before the fuzz: ``targets`` are the ids aimed at per operation."""

    ids: list[str]
    keys: list[str]
    targets: dict[str, list[str]]


@dataclass
class Served:
    """The API on its own loop, the file behind it, and what the fuzz saw."""

    portal: BlockingPortal
    client: httpx.AsyncClient
    db: sqlite3.Connection
    schema: BaseSchema
    sagas: Sagas
    statuses: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    wrote: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> tuple[Any, ...]:
        return tuple(self.db.execute(SNAPSHOT).fetchone())

    def send(self, case: Case) -> httpx.Response:
        """Send ``case`` as schemathesis puts it on the wire, always with the token."""
        kwargs = case.as_transport_kwargs(base_url="http://test")
        kwargs.pop("cookies", None)  # the API reads none
        kwargs["headers"].update(AUTH)  # also on cases generated to go without
        prepared = requests.Request(**kwargs).prepare()
        body = prepared.body.encode() if isinstance(prepared.body, str) else prepared.body

        async def request() -> httpx.Response:
            url, headers = prepared.url or "", dict(prepared.headers)
            return await self.client.request(case.method, url, headers=headers, content=body)

        try:
            return self.portal.call(request)
        except Exception as exc:  # raised by the app: say which request did it
            exc.add_note(f"request: {case.method} {prepared.url} {body!r}")
            raise

    def exchange(self, operation: APIOperation, case: Case) -> None:
        """Send ``case`` and run the checks on the answer."""
        before = self.snapshot()
        response = self.send(case)
        after = self.snapshot()
        self.statuses[operation.label][response.status_code] += 1
        if response.is_success and after != before:
            self.wrote[operation.label] += 1
        case.validate_response(response, checks=[*CHECKS, _unchanged_on_4xx(before, after)])


async def _make_sagas(url: str) -> Sagas:
    """Sagas in every state the write routes act on, made by an App that executes them:
    completed ones (with idempotency keys), ones that need attention (for retry and
    resolve) and ones waiting for a signal (for signals and cancel)."""
    app = App(url, poll_interval=0.02)
    register(app)
    async with app:
        keys = [f"order-{n}" for n in range(2)]
        done = [(await app.start("Order", {"sku": "A"}, idempotency_key=k)).id for k in keys]
        broken = [(await app.start("Broken", {"sku": "B"})).id for _ in range(6)]
        waiting = [(await app.start("Approval")).id for _ in range(6)]
        states = await asyncio.gather(*(app.wait(i) for i in done + broken))
        assert {s.state for s in states} == {SagaState.COMPLETED, SagaState.NEEDS_ATTENTION}
        async with asyncio.timeout(10):
            while not all([(await app.get(i)).waiting for i in waiting]):
                await asyncio.sleep(0.02)
    # Each route gets sagas of its own to act on, and completed ones it must refuse.
    targets = {
        "POST /api/sagas/{saga_id}/retry": broken[:3] + done,
        "POST /api/sagas/{saga_id}/resolve": broken[3:] + done,
        "POST /api/sagas/{saga_id}/signals": waiting[:3] + done,
        "POST /api/sagas/{saga_id}/cancel": waiting[3:] + done,
    }
    return Sagas(ids=done + broken + waiting, keys=keys, targets=targets)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    path = tmp_path_factory.mktemp("fuzz") / "sagas.db"
    url = f"sqlite:///{path}"
    with start_blocking_portal() as portal:
        sagas = portal.call(_make_sagas, url)
        app = App(url, worker=False)  # only the requests write
        register(app)
        portal.call(app.open)
        transport = httpx.ASGITransport(app=create_api(app, token=TOKEN))
        client = httpx.AsyncClient(transport=transport, base_url="http://test")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            document = portal.call(lambda: client.get("/openapi.json", headers=AUTH))
            assert document.status_code == 200, document.text
            schema = schemathesis.openapi.from_dict(document.json())
            yield Served(portal=portal, client=client, db=db, schema=schema, sagas=sagas)
        finally:
            db.close()
            portal.call(client.aclose)
            portal.call(app.close)


def _cases(served: Served, operation: APIOperation, mode: GenerationMode) -> Any:
    """The cases of ``operation``: half generated freely, half aimed at what exists."""

    def aimed(values: list[str], fixed: Callable[[str], dict[str, Any]]) -> Any:
        return st.sampled_from(values).flatmap(
            lambda v: operation.as_strategy(generation_mode=mode, **fixed(v))
        )

    free = operation.as_strategy(generation_mode=mode)
    sagas = served.sagas
    if "{saga_id}" in operation.path:
        ids = sagas.targets.get(operation.label, sagas.ids)
        return free | aimed(ids, lambda i: {"path_parameters": {"saga_id": i}})
    if "{saga_type}" in operation.path:
        return free | aimed(TYPES, lambda t: {"path_parameters": {"saga_type": t}})
    if operation.label == "GET /api/sagas":
        return (
            free
            | aimed(sagas.keys, lambda k: {"query": {"idempotency_key": k}})
            | aimed(sagas.ids, lambda i: {"query": {"id": i}})
            | aimed(TYPES, lambda t: {"query": {"type": t}})
        )
    if operation.label == "POST /api/sagas":
        choices = st.tuples(st.sampled_from(TYPES), st.sampled_from([None, *sagas.keys]))
        return free | st.tuples(free, choices).map(_with_start)
    return free


def _with_start(drawn: tuple[Case, tuple[str, str | None]]) -> Case:
    """A start case with a registered type and, maybe, an idempotency key already used."""
    case, (saga_type, key) = drawn
    if isinstance(case.body, dict) and isinstance(case.body.get("type"), str):
        case.body["type"] = saga_type
        if key is not None and "idempotency_key" in case.body:
            case.body["idempotency_key"] = key
    return case


def _unchanged_on_4xx(before: tuple[Any, ...], after: tuple[Any, ...]) -> Any:
    """A schemathesis check: an answer in the 4xx range wrote nothing to the store."""

    def store_unchanged_on_4xx(ctx: Any, response: schemathesis.Response, case: Case) -> None:
        if 400 <= response.status_code < 500:
            assert after == before, (
                f"{case.operation.label} answered {response.status_code} but the store changed:"
                f" {before[:4]} -> {after[:4]} (sagas, journal entries, signals, outbox)"
            )

    return store_unchanged_on_4xx


def _fuzz(served: Served, operation: APIOperation, mode: GenerationMode) -> None:
    """Generated requests (schemathesis's fuzzing phase)."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same requests every run
        database=None,
        suppress_health_check=TOLERATED,
    )
    @given(case=_cases(served, operation, mode))
    def fuzz(case: Case) -> None:
        served.exchange(operation, case)

    fuzz()


def _boundaries(served: Served, operation: APIOperation) -> None:
    """Each parameter at and just past its limits, of the wrong type, missing (schemathesis's
    coverage phase: deterministic, a few dozen requests per operation)."""
    schema = served.schema
    config = schema.config.generation_for(operation=operation)
    cases = schema.iter_coverage_cases(
        operation, generation_modes=list(GenerationMode), generation_config=config
    )
    for case in cases:
        served.exchange(operation, case)


def test_no_request_gets_a_5xx_or_writes_and_is_refused(served: Served) -> None:
    operations = [result.ok() for result in served.schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert labels >= WRITES
    assert len(labels) >= 11
    for operation in operations:
        _boundaries(served, operation)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(served, operation, mode)

    # Not a fuzz of nothing: every operation ran, every write route wrote (the snapshot sees
    # writes) and refused (so the check compared something), and every read succeeded.
    assert set(served.statuses) == labels
    for label, statuses in served.statuses.items():
        assert statuses.total() >= EXAMPLES, (label, statuses)
        assert any(200 <= s < 300 for s in statuses), (label, statuses)
        if label in WRITES:
            assert served.wrote[label] > 0, (label, statuses)
            assert any(400 <= s < 500 for s in statuses), (label, statuses)
