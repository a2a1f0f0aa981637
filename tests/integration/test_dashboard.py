"""The dashboard over httpx's ASGI transport: login, escaping, CSRF, the action forms and
paging, on an App that runs the sagas on a temporary SQLite file."""

from __future__ import annotations

import re

import httpx
from dashboard_helpers import TOKEN, browser_fixture, client_for, csrf_of, log_in, register  # noqa: F401 (the browser fixture)

from sagakit import App, Kind, SagaState
from sagakit.api import create_api
from sagakit.testing import until_waiting


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


# -- the signal and cancel forms ----------------------------------------------------------------


async def test_the_signal_form_resumes_a_waiting_saga(app: App, browser: httpx.AsyncClient) -> None:
    handle = await app.start("Approval", {"sku": "PEN"})
    assert (await until_waiting(app, handle.id)).waiting
    page = (await browser.get(f"/sagas/{handle.id}")).text
    assert 'action="/sagas/' + handle.id + '/signal"' in page
    url, csrf = f"/sagas/{handle.id}/signal", csrf_of(page)

    bad = await browser.post(url, data={"csrf": csrf, "name": "decision", "payload": "{oops"})
    assert bad.status_code == 303
    assert (
        "signal failed: the payload is not JSON"
        in (await browser.get(bad.headers["location"])).text
    )
    assert (await app.get(handle.id)).waiting

    payload = '{"approve": true, "by": "<b>ann</b>"}'
    r = await browser.post(url, data={"csrf": csrf, "name": "decision", "payload": payload})
    assert r.status_code == 303
    assert r.headers["location"] == f"/sagas/{handle.id}"
    flashed = (await browser.get(r.headers["location"])).text
    assert "Signal &#x27;decision&#x27; sent." in flashed
    again = (await browser.get(f"/sagas/{handle.id}")).text
    assert "Signal &#x27;decision&#x27; sent." not in again  # shown once
    done = await app.wait(handle.id)
    assert done.state is SagaState.COMPLETED
    assert done.output == {"approved": True, "by": "<b>ann</b>"}
    shown = (await browser.get(f"/sagas/{handle.id}")).text
    assert "<td>✉ signal &#x27;decision&#x27;</td><td></td><td>received</td>" in shown
    assert "&lt;b&gt;ann&lt;/b&gt;" in shown
    assert "<b>ann</b>" not in shown


async def test_a_double_submitted_signal_form_is_stored_once(
    app: App, browser: httpx.AsyncClient
) -> None:
    handle = await app.start("Approval", {"sku": "PEN"})
    assert (await until_waiting(app, handle.id)).waiting
    page = (await browser.get(f"/sagas/{handle.id}")).text
    signal_id = re.search(r'name=signal_id value="([0-9a-f]{32})"', page)
    assert signal_id is not None
    form = {"csrf": csrf_of(page), "signal_id": signal_id[1], "name": "memo", "payload": "1"}
    first = await browser.post(f"/sagas/{handle.id}/signal", data=form)
    assert "Signal &#x27;memo&#x27; sent." in (await browser.get(first.headers["location"])).text
    second = await browser.post(f"/sagas/{handle.id}/signal", data=form)  # e.g. a double click
    assert (
        "Signal &#x27;memo&#x27; was already sent."
        in (await browser.get(second.headers["location"])).text
    )
    assert [s.name for s in await app.store.signals(handle.id)] == ["memo"]
    fresh = (await browser.get(f"/sagas/{handle.id}")).text
    assert signal_id[1] not in fresh  # each rendered form has its own id


async def test_the_cancel_form_compensates_a_waiting_saga(
    app: App, browser: httpx.AsyncClient
) -> None:
    handle = await app.start("Approval", {"sku": "PEN"})
    await until_waiting(app, handle.id)
    csrf = csrf_of((await browser.get(f"/sagas/{handle.id}")).text)
    r = await browser.post(
        f"/sagas/{handle.id}/cancel", data={"csrf": csrf, "reason": "customer changed their mind"}
    )
    assert r.status_code == 303
    assert "Cancel requested" in (await browser.get(f"/sagas/{handle.id}")).text
    assert (await app.wait(handle.id)).state is SagaState.CANCELLED
    undone = [e.step for e in await app.journal(handle.id) if e.kind is Kind.COMPENSATION_COMPLETED]
    assert undone == ["reserve"]
    shown = (await browser.get(f"/sagas/{handle.id}")).text
    assert 'id="state" class="state-cancelled">cancelled' in shown
    assert "reason: customer changed their mind" in shown
    assert 'data-step="reserve" data-state="compensated"' in shown
    assert "No action applies in this state." in shown


async def test_refused_posts_write_nothing(app: App, browser: httpx.AsyncClient) -> None:
    handle = await app.start("Approval", {"sku": "PEN"})
    await until_waiting(app, handle.id)
    before = await app.journal(handle.id)
    csrf = csrf_of((await browser.get(f"/sagas/{handle.id}")).text)
    signal = {"name": "decision", "payload": '{"approve": true, "by": "mallory"}'}
    for action, form in (("signal", signal), ("cancel", {"reason": "mallory"})):
        url = f"/sagas/{handle.id}/{action}"
        refused = [
            await browser.post(url, data=form),
            await browser.post(url, data={**form, "csrf": csrf[:-1]}),
            await browser.post(url, data={**form, "csrf": csrf}, headers={"Origin": "http://evil"}),
            await browser.post(
                url, data={**form, "csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"}
            ),
        ]
        assert [r.status_code for r in refused] == [403] * 4, action
        assert all("set-cookie" not in r.headers for r in refused)
    async with client_for(app, TOKEN) as anonymous:
        r = await anonymous.post(f"/sagas/{handle.id}/cancel", data={"csrf": csrf})
        assert r.status_code == 403
        assert "log in first" in r.text
    assert await app.journal(handle.id) == before
    assert (await app.get(handle.id)).waiting
    # Had a refused signal or cancel been stored, the saga would now get mallory's decision
    # (signals are delivered in the order sent) or end cancelled.
    await app.signal(handle.id, "decision", {"approve": True, "by": "ann"})
    done = await app.wait(handle.id)
    assert (done.state, done.output) == (SagaState.COMPLETED, {"approved": True, "by": "ann"})


# -- paging -------------------------------------------------------------------------------------


def ids_in(html: str) -> list[str]:
    return re.findall(r'<tr data-saga="([^"]+)"', html)


def link(html: str, name: str) -> str | None:
    found = re.search(rf'<a id="{name}" href="([^"]+)"', html)
    return None if found is None else found.group(1).replace("&amp;", "&")


async def test_paging_through_the_list(app: App, browser: httpx.AsyncClient) -> None:
    for n in range(5):
        await app.wait((await app.start("Order", {"sku": f"S{n}"})).id)
    failed = await app.start("Refund", {"sku": "PEN"})
    assert (await app.wait(failed.id)).state is SagaState.FAILED
    newest_first = [i.id for i in await app.list(state="completed")]
    assert len(newest_first) == 5

    first = (await browser.get("/", params={"state": "completed", "limit": "2"})).text
    assert ids_in(first) == newest_first[:2]
    assert "showing 1-2 of 5" in first
    assert link(first, "newer") is None
    assert link(first, "older") == "/?state=completed&limit=2&offset=2"
    second = (await browser.get(link(first, "older") or "")).text
    assert ids_in(second) == newest_first[2:4]
    assert "showing 3-4 of 5" in second
    assert link(second, "newer") == "/?state=completed&limit=2"
    # The live refresh asks for the page it is on, and keeps it.
    live = (await browser.get("/?state=completed&limit=2&offset=2&fragment=1")).text
    assert ids_in(live) == newest_first[2:4]
    assert "<html" not in live
    assert link(live, "older") == "/?state=completed&limit=2&offset=4"
    last = (await browser.get("/?state=completed&limit=2&offset=4")).text
    assert ids_in(last) == newest_first[4:]
    assert "showing 5-5 of 5" in last
    assert link(last, "older") is None
    assert '<b data-state="failed">1</b>' in last  # the counts stay those of every state

    # With a type filter the counts and the total are that type's.
    typed = (await browser.get("/", params={"type": "Order", "limit": "3"})).text
    assert "showing 1-3 of 5" in typed
    assert "Order, by state: " in typed
    assert '<b data-state="failed">0</b>' in typed  # the failed saga is a Refund
    assert '<b data-state="completed">5</b>' in typed
    assert 'name=limit value="3"' in typed  # a new filter keeps the page size
    typed_last = (await browser.get(link(typed, "older") or "")).text
    assert ids_in(typed_last) == newest_first[3:]
    assert "showing 4-5 of 5" in typed_last
    beyond = (await browser.get("/", params={"offset": "100"})).text
    assert ids_in(beyond) == []
    assert link(beyond, "newer") == "/?offset=50"


async def test_the_default_page_holds_fifty(app: App, browser: httpx.AsyncClient) -> None:
    handles = [await app.start("Order", {"sku": f"S{n}"}) for n in range(51)]
    page = (await browser.get("/")).text
    assert len(ids_in(page)) == 50
    assert "showing 1-50 of 51" in page
    older = (await browser.get(link(page, "older") or "")).text
    assert len(ids_in(older)) == 1
    assert {*ids_in(page), *ids_in(older)} == {h.id for h in handles}
