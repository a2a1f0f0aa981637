"""The FastAPI order API example over httpx's ASGI transport, with its lifespan run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from sagakit import App
from sagakit.examples.order_api import create_order_api

ORDER: dict[str, Any] = {
    "order_id": "order-0001",
    "customer_id": "customer-07",
    "items": [{"sku": "BOOK-1", "quantity": 2, "unit_price": "12.50"}],
    "payment_method": "visa-4242",
    "shipping_address": "1 Example Street, Springfield",
}


def order_api(tmp_path: Path) -> FastAPI:
    return create_order_api(
        f"sqlite:///{tmp_path / 'orders.db'}",
        decline_rate=0,
        shipment_failure_rate=0,
        glitch_rate=0,
    )


def test_building_the_app_touches_no_disk(tmp_path: Path) -> None:
    order_api(tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, App]]:
    api = order_api(tmp_path)
    async with api.router.lifespan_context(api):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, api.state.sagas


async def settled(client: httpx.AsyncClient, saga_id: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            r = await client.get(f"/orders/{saga_id}")
            assert r.status_code == 200
            body: dict[str, Any] = r.json()
            if body["state"] not in ("started", "running", "compensating"):
                return body
            await asyncio.sleep(0.02)


async def test_an_order_starts_a_saga_that_completes(
    served: tuple[httpx.AsyncClient, App],
) -> None:
    client, _ = served
    r = await client.post("/orders", json=ORDER, headers={"Idempotency-Key": "key-1"})
    assert r.status_code == 202
    assert r.json()["created"] is True
    body = await settled(client, r.json()["saga_id"])
    assert body["state"] == "completed"
    assert body["error"] is None
    assert set(body["output"]) >= {"reserve_inventory", "process_payment"}
    assert body["output"]["process_payment"]["amount"] == "25.00"


async def test_the_same_idempotency_key_gives_one_saga(
    served: tuple[httpx.AsyncClient, App],
) -> None:
    client, sagas = served
    first = await client.post("/orders", json=ORDER, headers={"Idempotency-Key": "key-1"})
    again = await client.post("/orders", json=ORDER, headers={"Idempotency-Key": "key-1"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json() == {"saga_id": first.json()["saga_id"], "created": False}
    assert len(await sagas.list()) == 1
    await settled(client, first.json()["saga_id"])


async def test_a_missing_idempotency_key_is_400_and_writes_nothing(
    served: tuple[httpx.AsyncClient, App],
) -> None:
    client, sagas = served
    for headers in ({}, {"Idempotency-Key": ""}):
        r = await client.post("/orders", json=ORDER, headers=headers)
        assert r.status_code == 400
        assert r.json()["error"] == "missing_idempotency_key"
        assert "Idempotency-Key" in r.json()["detail"]
    assert await sagas.list() == []


async def test_a_bad_order_is_422(served: tuple[httpx.AsyncClient, App]) -> None:
    client, sagas = served
    bad = {**ORDER, "items": []}
    r = await client.post("/orders", json=bad, headers={"Idempotency-Key": "key-1"})
    assert r.status_code == 422
    assert await sagas.list() == []


async def test_an_unknown_saga_id_is_404(served: tuple[httpx.AsyncClient, App]) -> None:
    client, _ = served
    r = await client.get("/orders/no-such-saga")
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"
