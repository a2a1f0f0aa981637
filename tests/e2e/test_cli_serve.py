"""``sagakit serve`` run as a subprocess: it refuses to start unsafely, and serves with a token."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

APP_MODULE = """
from sagakit import App, Saga, step

async def reserve(ctx, data):
    return ["reserved", data]

app = App("sqlite:///{db}", poll_interval=0.05)
app.register(Saga("Order", steps=[step("reserve", reserve)]))
"""


def write_app(tmp_path: Path) -> None:
    (tmp_path / "serve_app.py").write_text(
        textwrap.dedent(APP_MODULE).replace("{db}", str(tmp_path / "s.db"))
    )


def said(result: subprocess.CompletedProcess[str]) -> str:
    """stderr with the terminal's line wrapping undone."""
    return " ".join(result.stderr.split())


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    return {**env, **extra}


def serve(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sagakit", "serve", "--app", "serve_app:app", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    write_app(tmp_path)
    result = serve(cwd=tmp_path, env=clean_env())
    assert result.returncode == 2
    assert "no API token" in said(result)
    assert "SAGAKIT_API_TOKEN" in said(result)
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    result = serve("--token-file", str(empty), cwd=tmp_path, env=clean_env())
    assert result.returncode == 2
    assert "is empty" in said(result)
    assert not (tmp_path / "s.db").exists()


def test_insecure_refuses_a_non_loopback_host(tmp_path: Path) -> None:
    write_app(tmp_path)
    for host in ("0.0.0.0", "192.168.1.10", "example.com"):  # noqa: S104 (what is refused)
        result = serve("--insecure", "--host", host, cwd=tmp_path, env=clean_env())
        assert result.returncode == 2, host
        assert "loopback" in said(result)
    assert not (tmp_path / "s.db").exists()


def test_serves_the_api_with_a_token_and_stops_on_sigterm(tmp_path: Path) -> None:
    write_app(tmp_path)
    token = secrets.token_urlsafe(24)
    token_file = tmp_path / "api.token"
    token_file.write_text(token + "\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sagakit", "serve", "--app", "serve_app:app",
         "--port", str(port), "--token-file", str(token_file), "--log-level", "warning",
         "--metrics"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/api/sagas"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.communicate()
            try:
                refused = httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)
        assert refused.status_code == 401
        r = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert r.status_code == 200
        assert r.json() == {"items": [], "limit": 50, "offset": 0, "next_offset": None}
        auth = {"Authorization": f"Bearer {token}"}
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=auth, timeout=5)
        assert scraped.status_code == 200
        assert "sagakit_sagas_in_flight 0.0" in scraped.text
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "sagakit serve stopped" in stderr


def test_insecure_serves_the_dashboard_without_a_login(tmp_path: Path) -> None:
    write_app(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sagakit", "serve", "--app", "serve_app:app", "--insecure",
         "--port", str(port), "--log-level", "warning"],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.communicate()
            try:
                started = httpx.post(f"{base}/api/sagas", json={"type": "Order", "data": 1})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)
        assert started.status_code == 201, started.text  # no token asked
        with httpx.Client(base_url=base, follow_redirects=True, timeout=5) as browser:
            page = browser.get("/")
            assert page.status_code == 200
            assert [str(r.url.path) for r in page.history] == ["/", "/login"]
            assert started.json()["id"] in page.text
            assert "sagakit_session" in browser.cookies
        # Addressed by another name (DNS rebinding), the dashboard opens no session.
        other = httpx.get(f"{base}/login", headers={"Host": f"attacker.example:{port}"})
        assert other.status_code == 403
        assert "set-cookie" not in other.headers
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
