"""The dashboard end to end: ``sagakit serve`` as a subprocess, driven by headless Chromium.

Needs Debian's chromium at /usr/bin/chromium and the ``playwright`` package (its own browser
downloads are never used). Skipped without them, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = os.environ.get("SAGAKIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

APP_MODULE = """
from sagakit import App, RetryPolicy, Saga, step

async def reserve(ctx, data):
    return {"reserved": data["sku"]}

async def release(ctx, data, result):
    return None

async def charge(ctx, data):
    raise RuntimeError("card declined")

async def broken_undo(ctx, data, result):
    raise ConnectionError("inventory service unavailable")

app = App("sqlite:///{db}", poll_interval=0.05)
app.register(Saga("Order", steps=[step("reserve", reserve, compensate=release)]))
app.register(Saga("Refund", steps=[step("reserve", reserve, compensate=release),
                                   step("charge", charge)]))
once = RetryPolicy(max_attempts=1, initial_interval=0.001)
app.register(Saga("Broken", steps=[
    step("reserve", reserve, compensate=broken_undo, compensate_retry=once),
    step("charge", charge),
]))

@app.saga("Approval")
async def approval(ctx, data):
    await ctx.step(reserve, data, compensate=release)
    decision = await ctx.wait_for_signal("decision")
    return {"approved": decision["approve"], "by": decision["by"]}
"""


def _missing() -> str | None:
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    return None


@pytest.fixture
def chromium_ready() -> None:
    problem = _missing()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run in CI: {problem}")
        pytest.skip(problem)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path, chromium_ready: None) -> Iterator[tuple[str, str]]:
    """``sagakit serve`` on a free loopback port: (base URL, token)."""
    (tmp_path / "dash_app.py").write_text(
        textwrap.dedent(APP_MODULE).replace("{db}", str(tmp_path / "d.db"))
    )
    token = secrets.token_urlsafe(24)
    (tmp_path / "api.token").write_text(token + "\n")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "sagakit", "serve", "--app", "dash_app:app", "--port", str(port),
         "--token-file", str(tmp_path / "api.token"), "--log-level", "warning"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.communicate()
            try:
                httpx.get(f"{base}/api/sagas", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)
        yield base, token
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def _start_and_settle(base: str, token: str) -> dict[str, str]:
    """Start one saga of each type over the API; their ids once each has settled."""
    auth = {"Authorization": f"Bearer {token}"}
    ids = {}
    for saga_type in ("Order", "Refund", "Broken"):
        body = {"type": saga_type, "data": {"sku": "<script>alert(1)</script>"}}
        r = httpx.post(f"{base}/api/sagas", json=body, headers=auth, timeout=5)
        assert r.status_code == 201, r.text
        ids[saga_type] = r.json()["id"]
    want = {"Order": "completed", "Refund": "failed", "Broken": "needs_attention"}
    deadline = time.monotonic() + 30
    for saga_type, saga_id in ids.items():
        while (
            state := httpx.get(f"{base}/api/sagas/{saga_id}", headers=auth, timeout=5).json()[
                "state"
            ]
        ) != want[saga_type]:
            assert time.monotonic() < deadline, (saga_type, state)
            time.sleep(0.1)
    return ids


def _start(base: str, token: str, saga_type: str, data: object) -> str:
    auth = {"Authorization": f"Bearer {token}"}
    body = {"type": saga_type, "data": data}
    r = httpx.post(f"{base}/api/sagas", json=body, headers=auth, timeout=5)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _reload_until(page: Any, selector: str, text: str) -> None:
    """The saga page does not refresh itself: reload it until ``selector`` shows ``text``."""
    deadline = time.monotonic() + 15
    while text not in page.locator(selector).inner_text():
        assert time.monotonic() < deadline, page.locator(selector).inner_text()
        time.sleep(0.2)
        page.reload()


def test_the_dashboard_in_chromium(server: tuple[str, str], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, token = server
    ids = _start_and_settle(base, token)
    dialogs: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"{base}/")
            assert page.url.endswith("/login")
            page.fill("input[name=token]", token)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/")

            # The list shows the run's sagas, and counts them by state.
            for saga_id in ids.values():
                expect(page.locator(f'tr[data-saga="{saga_id}"]')).to_be_visible()
            expect(page.locator('b[data-state="needs_attention"]')).to_have_text("1")

            # A saga page shows its compensations.
            page.click(f'a[href="/sagas/{ids["Refund"]}"]')
            expect(page.locator('[data-step="reserve"]')).to_have_attribute(
                "data-state", "compensated"
            )
            expect(page.locator("#timeline")).to_contain_text("↩ reserve")
            expect(page.locator("#timeline")).to_contain_text("compensated")
            expect(page.locator("body")).to_contain_text("<script>alert(1)</script>")

            # Resolving the parked saga by hand ends it failed.
            page.goto(f"{base}/sagas/{ids['Broken']}")
            expect(page.locator("#state")).to_have_text("needs_attention")
            page.fill("input[name=note]", "refunded by hand")
            page.click("button[value=resolve]")
            expect(page.locator("#flash")).to_contain_text("Resolved by hand")
            expect(page.locator("#state")).to_have_text("failed")
            expect(page.locator("#timeline")).to_contain_text("refunded by hand")

            # A signal sent from the saga page resumes the saga waiting for it.
            waiting = _start(base, token, "Approval", {"sku": "PEN"})
            page.goto(f"{base}/sagas/{waiting}")
            _reload_until(page, "#timeline", "✉ signal 'decision'")
            expect(page.locator("#state")).to_have_text("running (waiting)")
            page.fill("input[name=name]", "decision")
            page.fill("input[name=payload]", '{"approve": true, "by": "<i>ann</i>"}')
            page.click("button[value=signal]")
            expect(page.locator("#flash")).to_contain_text("Signal 'decision' sent.")
            _reload_until(page, "#state", "completed")
            expect(page.locator("#timeline")).to_contain_text("received")
            expect(page.locator("#timeline")).to_contain_text("saga completed")
            expect(page.locator("body")).to_contain_text('"by": "<i>ann</i>"')

            # The list updates live, without a reload.
            page.goto(f"{base}/")
            expect(page.locator('b[data-state="needs_attention"]')).to_have_text("0")
            new_id = _start(base, token, "Order", {"sku": "LIVE"})
            expect(page.locator(f'tr[data-saga="{new_id}"]')).to_be_visible(timeout=10_000)

            # Paging: two a page; the live refresh stays on the page shown.
            page.goto(f"{base}/?limit=2")
            expect(page.locator("#showing")).to_have_text("showing 1-2 of 5")
            page.click("#older")
            page.wait_for_url(f"{base}/?limit=2&offset=2")
            expect(page.locator("#showing")).to_have_text("showing 3-4 of 5")
            _start(base, token, "Order", {"sku": "LATER"})
            expect(page.locator("#showing")).to_have_text("showing 3-4 of 6", timeout=10_000)
            expect(page.locator("#sagas tbody tr")).to_have_count(2)
            assert page.url == f"{base}/?limit=2&offset=2"

            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)

            # When the session ends, the live refresh sends the page to the login form.
            page.context.clear_cookies()
            page.wait_for_url(f"{base}/login", timeout=10_000)
        finally:
            browser.close()
    assert shot.exists()
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert dialogs == []  # no payload ran as script
