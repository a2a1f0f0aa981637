"""The dashboard's sessions: signed stateless cookies, their expiry and key, CSRF tokens bound
to them, logging out, and ``--insecure``'s login without a token (at loopback names only)."""

from __future__ import annotations

import secrets
import time

import httpx
from dashboard_helpers import TOKEN, browser_fixture, client_for, csrf_of, log_in, register  # noqa: F401 (the browser fixture)

from sagakit import App, SagaState
from sagakit.api.auth import SESSION_SECONDS, SessionCookies
from sagakit.api.dashboard import COOKIE
from sagakit.testing import until_waiting


async def test_a_session_is_a_signed_stateless_cookie(app: App) -> None:
    register(app)
    async with client_for(app, TOKEN) as first:
        cookie = (await log_in(first)).headers["set-cookie"].lower()
        assert f"max-age={SESSION_SECONDS}" in cookie
        assert "secure" not in cookie  # plain http: a Secure cookie would never come back
        session = first.cookies[COOKIE]
    # Another process serving the same token (or this one after a restart) accepts it.
    async with client_for(app, TOKEN) as second:
        second.cookies[COOKIE] = session
        assert (await second.get("/")).status_code == 200
    # Rotating the token logs everyone out.
    async with client_for(app, secrets.token_urlsafe(24)) as rotated:
        rotated.cookies[COOKIE] = session
        r = await rotated.get("/")
        assert r.status_code == 303
        assert r.headers["location"] == "/login"
    async with client_for(app, TOKEN, "https://test") as tls:
        r = await tls.post("/login", data={"token": TOKEN}, headers={"Origin": "https://test"})
        assert "secure" in r.headers["set-cookie"].lower()


async def test_forged_and_expired_cookies_are_refused(app: App) -> None:
    register(app)
    handle = await app.start("Approval", {"sku": "PEN"})
    await until_waiting(app, handle.id)
    before = await app.journal(handle.id)
    mine, other = SessionCookies(TOKEN), SessionCookies(secrets.token_urlsafe(24))
    then = time.time() - SESSION_SECONDS - 1
    expired = mine.issue(now=then)
    version, expires, nonce, mac = mine.issue().split(".")
    stretched = f"{version}.{int(expires) + 10 * SESSION_SECONDS}.{nonce}.{mac}"
    # Each cookie with the CSRF token that went with it where it was valid, if anywhere.
    foreign = other.issue()
    forged = {
        foreign: other.check(foreign),
        expired: mine.check(expired, now=then + 1),
        stretched: None,
        mine.issue(now=time.time() + 10 * SESSION_SECONDS): None,
        "v1.9999999999.x.y": None,
        "garbage": None,
    }
    assert forged[foreign] is not None
    assert forged[expired] is not None
    async with client_for(app, TOKEN) as c:
        for cookie, session in forged.items():
            c.cookies[COOKIE] = cookie
            r = await c.get("/")
            assert (r.status_code, r.headers["location"]) == (303, "/login"), cookie
            csrf = "x" if session is None else session.csrf
            r = await c.post(f"/sagas/{handle.id}/cancel", data={"csrf": csrf})
            assert r.status_code == 403, cookie
            assert "log in first" in r.text
        c.cookies[COOKIE] = mine.issue()  # the same key, fresh: accepted
        assert (await c.get("/")).status_code == 200
    assert await app.journal(handle.id) == before


async def test_a_csrf_token_belongs_to_its_session(app: App, browser: httpx.AsyncClient) -> None:
    handle = await app.start("Approval", {"sku": "PEN"})
    await until_waiting(app, handle.id)
    theirs = csrf_of((await browser.get(f"/sagas/{handle.id}")).text)
    async with client_for(app, TOKEN) as me:
        await log_in(me)
        mine = csrf_of((await me.get(f"/sagas/{handle.id}")).text)
        assert mine != theirs
        r = await me.post(f"/sagas/{handle.id}/cancel", data={"csrf": theirs})
        assert r.status_code == 403
    assert (await app.get(handle.id)).waiting


async def test_logout_clears_the_cookie(app: App, browser: httpx.AsyncClient) -> None:
    page = (await browser.get("/")).text
    assert 'action="/logout"' in page
    session = browser.cookies[COOKIE]
    assert (await browser.post("/logout", data={"csrf": "wrong"})).status_code == 403
    r = await browser.post("/logout", data={"csrf": csrf_of(page)})
    assert (r.status_code, r.headers["location"]) == (303, "/login")
    assert COOKIE not in browser.cookies
    assert (await browser.get("/")).status_code == 303
    # Stateless: a copy of the cookie kept elsewhere stays valid until it expires (documented).
    browser.cookies[COOKIE] = session
    assert (await browser.get("/")).status_code == 200


async def test_insecure_mode_logs_in_without_asking_on_loopback_only(app: App) -> None:
    register(app)
    handle = await app.start("Order", {"sku": "BOOK"})
    async with client_for(app, None, "http://127.0.0.1:8000") as c:
        r = await c.get("/", follow_redirects=True)
        assert r.status_code == 200
        assert [h.headers["location"] for h in r.history] == ["/login", "/"]
        assert handle.id in r.text
        assert (await c.get("/api/sagas")).status_code == 200  # no bearer token needed
        assert (await app.wait(handle.id)).state is SagaState.COMPLETED
    for base in ("http://localhost:8000", "http://[::1]:8000"):
        async with client_for(app, None, base) as c:
            assert (await c.get("/", follow_redirects=True)).status_code == 200, base
    # A name re-pointed at 127.0.0.1 by its DNS (rebinding) gets no session.
    async with client_for(app, None, "http://evil.example:8000") as c:
        r = await c.get("/login")
        assert r.status_code == 403
        assert "set-cookie" not in r.headers
        assert (await c.get("/")).status_code == 403
        api = await c.get("/api/sagas")  # nor can it read or act through the API
        assert api.status_code == 403
        assert "answers only at localhost" in api.json()["detail"]
        assert (await c.post(f"/api/sagas/{handle.id}/cancel", json={})).status_code == 403
        assert (await app.get(handle.id)).state is SagaState.COMPLETED
