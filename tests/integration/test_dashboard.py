"""The dashboard over httpx's ASGI transport: login, escaping, CSRF and an action."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from sagakit import App, RetryPolicy, Saga, SagaState, step
from sagakit.api import create_api

TOKEN = secrets.token_urlsafe(24)
FAST = 0.001


async def reserve(ctx: Any, data: Any) -> dict[str, Any]:
    return {"reserved": data["sku"]}


async def release(ctx: Any, data: Any, result: Any) -> None:
    return None


async def fail_for_good(ctx: Any, data: Any) -> None:
    raise RuntimeError("card declined <b>")


async def broken_undo(ctx: Any, data: Any, result: Any) -> None:
    raise ConnectionError("inventory service unavailable")


def register(app: App) -> None:
    app.register(Saga("Order", steps=[step("reserve", reserve, compensate=release)]))
    app.register(
        Saga(
            "Refund",
            steps=[step("reserve", reserve, compensate=release), step("charge", fail_for_good)],
        )
    )
    undo_policy = RetryPolicy(max_attempts=1, initial_interval=FAST)
    app.register(
        Saga(
            "Broken",
            steps=[
                step("reserve", reserve, compensate=broken_undo, compensate_retry=undo_policy),
                step("charge", fail_for_good),
            ],
        )
    )


@pytest.fixture
async def browser(app: App) -> AsyncIterator[httpx.AsyncClient]:
    """A client logged in to the dashboard (it holds the session cookie)."""
    register(app)
    transport = httpx.ASGITransport(app=create_api(app, token=TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.post("/login", data={"token": TOKEN})
        assert r.status_code == 303
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        yield c


def csrf_of(html: str) -> str:
    found = re.search(r'name=csrf value="([^"]+)"', html)
    assert found, html
    return found.group(1)


async def test_the_dashboard_needs_a_login(app: App) -> None:
    register(app)
    transport = httpx.ASGITransport(app=create_api(app, token=TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        for path in ("/", "/sagas/some-id"):
            r = await c.get(path)
            assert r.status_code == 303
            assert r.headers["location"] == "/login"
        assert (await c.post("/sagas/some-id/retry", data={"csrf": "x"})).status_code == 403
        # The bearer token does not open the dashboard, and the cookie does not open the API.
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert (await c.get("/", headers=bearer)).status_code == 303
        wrong = await c.post("/login", data={"token": TOKEN + "x"})
        assert wrong.status_code == 401
        assert "Wrong token" in wrong.text
        assert (await c.post("/login", data={"token": TOKEN})).status_code == 303
        assert (await c.get("/")).status_code == 200
        assert (await c.get("/api/sagas")).status_code == 401
        assert (await c.get("/nowhere")).status_code == 401


async def test_the_list_counts_and_filters(app: App, browser: httpx.AsyncClient) -> None:
    done = await app.start("Order", {"sku": "BOOK"})
    failed = await app.start("Refund", {"sku": "PEN"})
    assert (await app.wait(done.id)).state is SagaState.COMPLETED
    assert (await app.wait(failed.id)).state is SagaState.FAILED
    r = await browser.get("/")
    assert r.status_code == 200
    assert "script-src 'nonce-" in r.headers["content-security-policy"]
    assert done.id in r.text
    assert failed.id in r.text
    assert '<b data-state="completed">1</b>' in r.text
    assert '<b data-state="failed">1</b>' in r.text
    only = await browser.get("/", params={"state": "failed", "fragment": "1"})
    assert failed.id in only.text
    assert done.id not in only.text
    assert "<html" not in only.text  # just the live part
    typed = await browser.get("/", params={"type": "Order"})
    assert done.id in typed.text
    assert failed.id not in typed.text


async def test_saga_data_is_escaped(app: App, browser: httpx.AsyncClient) -> None:
    evil = "<script>alert(1)</script>"
    handle = await app.start("Refund", {"sku": evil}, idempotency_key=f'"><img src=x>{evil}')
    assert (await app.wait(handle.id)).state is SagaState.FAILED
    page = (await browser.get(f"/sagas/{handle.id}")).text
    assert "<script>alert" not in page
    assert "<img src=x>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "card declined &lt;b&gt;" in page
    listed = (await browser.get("/")).text
    assert "<script>alert" not in listed


async def test_a_saga_page_shows_steps_and_compensations(
    app: App, browser: httpx.AsyncClient
) -> None:
    handle = await app.start("Refund", {"sku": "PEN"})
    assert (await app.wait(handle.id)).state is SagaState.FAILED
    page = (await browser.get(f"/sagas/{handle.id}")).text
    assert 'data-step="reserve" data-state="compensated"' in page
    assert 'data-step="charge" data-state="failed"' in page
    assert "↩ reserve" in page  # the compensation in the timeline
    assert "flowchart TD" in page  # the Mermaid source
    missing = await browser.get("/sagas/no-such-saga")
    assert missing.status_code == 404


async def test_actions_need_the_csrf_token_and_origin(app: App, browser: httpx.AsyncClient) -> None:
    handle = await app.start("Broken", {"sku": "PEN"})
    assert (await app.wait(handle.id)).state is SagaState.NEEDS_ATTENTION
    before = await app.journal(handle.id)
    page = (await browser.get(f"/sagas/{handle.id}")).text
    csrf = csrf_of(page)
    url = f"/sagas/{handle.id}/resolve"
    for form in ({"note": "done"}, {"note": "done", "csrf": "wrong"}, {"note": "x", "csrf": ""}):
        assert (await browser.post(url, data=form)).status_code == 403
    cross = {"Origin": "http://evil.example"}
    r = await browser.post(url, data={"note": "done", "csrf": csrf}, headers=cross)
    assert r.status_code == 403
    r = await browser.post(
        url, data={"note": "done", "csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert r.status_code == 403
    assert await app.journal(handle.id) == before
    assert (await app.get(handle.id)).state is SagaState.NEEDS_ATTENTION

    r = await browser.post(
        url, data={"note": "refunded by hand", "csrf": csrf}, headers={"Origin": "http://test"}
    )
    assert r.status_code == 303
    assert r.headers["location"] == f"/sagas/{handle.id}"
    assert (await app.get(handle.id)).state is SagaState.FAILED
    shown = (await browser.get(f"/sagas/{handle.id}")).text
    assert "Resolved by hand" in shown
    assert "refunded by hand" in shown
    # A second resolve is refused by the saga's state and says so, as a flash.
    await browser.post(url, data={"note": "again", "csrf": csrf})
    assert "resolve failed" in (await browser.get(f"/sagas/{handle.id}")).text


async def test_retry_resumes_a_parked_saga(app: App, browser: httpx.AsyncClient) -> None:
    handle = await app.start("Broken", {"sku": "PEN"})
    assert (await app.wait(handle.id)).state is SagaState.NEEDS_ATTENTION
    csrf = csrf_of((await browser.get(f"/sagas/{handle.id}")).text)
    r = await browser.post(f"/sagas/{handle.id}/retry", data={"csrf": csrf})
    assert r.status_code == 303
    shown = (await browser.get(f"/sagas/{handle.id}")).text
    assert "Retry requested" in shown
    assert "operator retry" in shown


def test_dashboard_routes_stay_out_of_the_openapi_document(app: App) -> None:
    paths = create_api(app, token=TOKEN).openapi()["paths"]
    assert all(p.startswith("/api/") for p in paths), list(paths)
