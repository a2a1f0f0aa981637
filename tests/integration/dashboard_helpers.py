"""What the API and dashboard tests share: step functions, a token, a logged-in client."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from sagakit import App, RetryPolicy, Saga, WorkflowContext, step
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


async def approval(ctx: WorkflowContext, data: dict[str, Any]) -> dict[str, Any]:
    await ctx.step(reserve, data, compensate=release)
    decision = await ctx.wait_for_signal("decision")
    return {"approved": decision["approve"], "by": decision["by"]}


def broken() -> Saga:
    """reserve completes, charge fails, reserve's compensation keeps failing: the saga ends
    in needs_attention."""
    undo_policy = RetryPolicy(max_attempts=1, initial_interval=FAST)
    return Saga(
        "Broken",
        steps=[
            step("reserve", reserve, compensate=broken_undo, compensate_retry=undo_policy),
            step("charge", fail_for_good),
        ],
    )


def register(app: App) -> None:
    app.register(Saga("Order", steps=[step("reserve", reserve, compensate=release)]))
    app.saga("Approval")(approval)
    app.register(
        Saga(
            "Refund",
            steps=[step("reserve", reserve, compensate=release), step("charge", fail_for_good)],
        )
    )
    app.register(broken())


@pytest.fixture(name="browser")
async def browser_fixture(app: App) -> AsyncIterator[httpx.AsyncClient]:
    """A client logged in to the dashboard (it holds the session cookie)."""
    register(app)
    async with client_for(app, TOKEN) as c:
        cookie = (await log_in(c)).headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        yield c


def client_for(app: App, token: str | None, base: str = "http://test") -> httpx.AsyncClient:
    """A client of a new ``create_api`` over ``app`` (as a new server process would be)."""
    transport = httpx.ASGITransport(app=create_api(app, token=token))
    return httpx.AsyncClient(transport=transport, base_url=base)


async def log_in(client: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    r = await client.post("/login", data={"token": token})
    assert r.status_code == 303
    return r


def csrf_of(html: str) -> str:
    found = re.search(r'name=csrf value="([^"]+)"', html)
    assert found, html
    return found.group(1)
