"""The dashboard: HTML pages served by the API's app, for people with a browser.

``GET /`` lists sagas (counts by state, filters, refreshed every 2 s), ``GET /sagas/{id}``
shows one (summary, steps coloured by state, timeline, Mermaid source) with forms to retry,
resolve, cancel or signal it. None of these routes is in the OpenAPI document.

A browser cannot send the bearer header, so the dashboard logs in instead: ``POST /login``
with the API token opens a session, kept in memory, whose random id is an HttpOnly,
SameSite=Strict cookie. Dashboard paths accept only that cookie; API paths keep requiring the
bearer header (:class:`~sagakit.api.auth.BearerAuth` leaves the dashboard's paths to this
module). Every POST must carry the session's CSRF token, and is refused when its ``Origin`` (or
``Sec-Fetch-Site``) says it came from another site; pages may not be framed.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from sagakit.api import pages
from sagakit.errors import ConfigurationError, SagakitError, SagaNotFound
from sagakit.graph import graph_for
from sagakit.journal import ACTIVE, SagaState
from sagakit.timeline import timeline

if TYPE_CHECKING:
    from sagakit.app import App

COOKIE = "sagakit_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000
_LIST_LIMIT = 200
_PATHS = re.compile(r"^/(?:login|logout)?$|^/sagas/[^/]+(?:/(?:retry|cancel|resolve|signal))?$")
_ACTIONS = ("retry", "cancel", "resolve", "signal")


def is_dashboard_path(path: str) -> bool:
    """Whether ``path`` is one of the dashboard's (cookie auth) rather than the API's."""
    return _PATHS.match(path) is not None


@dataclass(slots=True)
class Session:
    csrf: str
    expires: float
    flash: tuple[str, bool] | None = None


class Sessions:
    """Logged-in browsers, by random session id; in memory, so a restart logs everyone out."""

    def __init__(self) -> None:
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def open(self) -> str:
        while len(self._by_id) >= MAX_SESSIONS:
            self._by_id.popitem(last=False)
        sid = secrets.token_urlsafe(32)
        self._by_id[sid] = Session(secrets.token_urlsafe(32), time.monotonic() + SESSION_SECONDS)
        return sid

    def get(self, sid: str | None) -> Session | None:
        session = self._by_id.get(sid) if sid else None
        if session is not None and session.expires < time.monotonic():
            del self._by_id[sid]  # type: ignore[arg-type]
            return None
        return session

    def close(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)


class DashboardAuth:
    """On dashboard paths: a session cookie is required (else a redirect to the login page, or
    403 for a POST) and a POST from another origin is refused."""

    def __init__(self, app: ASGIApp, *, sessions: Sessions) -> None:
        self.app = app
        self._sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_dashboard_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal: Response | None = None
        if request.method == "POST" and not _same_origin(request):
            refusal = _refused("cross-site request refused")
        elif scope["path"] != "/login":
            session = self._sessions.get(request.cookies.get(COOKIE))
            if session is None:
                refusal = (
                    RedirectResponse("/login", status_code=303)
                    if request.method in ("GET", "HEAD")
                    else _refused("log in first")
                )
            else:
                scope.setdefault("state", {})["session"] = session
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _same_origin(request: Request) -> bool:
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not sent by every browser on same-origin POSTs; the CSRF token decides
    return origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


def _headers(nonce: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
            "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        ),
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def _html(render: object, nonce: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(str(render), status_code=status_code, headers=_headers(nonce))


def _refused(detail: str) -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    body = pages.page("refused", f"<p>{pages.esc(detail)}</p>", nonce=nonce)
    return _html(body, nonce, 403)


async def _form(request: Request) -> dict[str, str]:
    fields = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


def _login_routes(api: FastAPI, sessions: Sessions, token: str | None) -> None:
    secret = None if token is None else token.encode()

    def logged_in(sid: str) -> Response:
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, sid, max_age=SESSION_SECONDS, httponly=True,
                            samesite="strict", path="/")  # fmt: skip
        return response

    @api.get("/login", include_in_schema=False)
    async def login_form() -> Response:
        if secret is None:
            return logged_in(sessions.open())
        nonce = secrets.token_urlsafe(16)
        return _html(pages.login_page(nonce=nonce, failed=False), nonce)

    @api.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        given = (await _form(request)).get("token", "").strip().encode()
        if secret is None or hmac.compare_digest(given, secret):
            return logged_in(sessions.open())
        nonce = secrets.token_urlsafe(16)
        return _html(pages.login_page(nonce=nonce, failed=True), nonce, 401)

    @api.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        csrf = (await _form(request)).get("csrf", "")
        if not hmac.compare_digest(csrf, _session_of(request).csrf):
            return _refused("missing or wrong CSRF token")
        sessions.close(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response


def _session_of(request: Request) -> Session:
    session: Session = request.state.session
    return session


def create_dashboard(api: FastAPI, app: App, token: str | None) -> None:
    """Add the dashboard's routes and its cookie-auth middleware to ``api``.

    With ``token=None`` (``--insecure``) the login page opens a session without asking."""
    sessions = Sessions()
    _login_routes(api, sessions, token)

    @api.get("/", include_in_schema=False)
    async def saga_list(request: Request) -> Response:
        query = request.query_params
        state = query.get("state") or None
        saga_type = query.get("type") or None
        if state is not None and state not in {s.value for s in SagaState}:
            state = None
        sagas = await app.list(state=state, saga_type=saga_type, limit=_LIST_LIMIT)
        fragment = pages.list_fragment(await app.store.counts(), sagas)
        nonce = secrets.token_urlsafe(16)
        if query.get("fragment"):
            return _html(fragment, nonce)
        types = sorted({*app.saga_types, *([saga_type] if saga_type else [])})
        body = pages.list_page(fragment, types=types, state=state, saga_type=saga_type,
                               nonce=nonce)  # fmt: skip
        return _html(body, nonce)

    @api.get("/sagas/{saga_id}", include_in_schema=False)
    async def saga_page(request: Request, saga_id: str) -> Response:
        nonce = secrets.token_urlsafe(16)
        try:
            info = await app.get(saga_id)
        except SagaNotFound:
            body = pages.page("not found", f"<p>No saga {pages.esc(saga_id)}.</p>", nonce=nonce)
            return _html(body, nonce, 404)
        entries = await app.journal(saga_id)
        try:
            graph = await graph_for(app, info.saga_type, version=info.version)
        except ConfigurationError:
            graph = ""
        session = _session_of(request)
        flash, session.flash = session.flash, None
        body = pages.saga_page(
            info,
            rows=timeline(entries, active=info.state in ACTIVE),
            start=entries[0].at if entries else 0.0,
            steps=pages.flow(app.definition(info.saga_type, info.version), entries),
            mermaid=graph,
            csrf=session.csrf,
            flash=flash,
            nonce=nonce,
        )
        return _html(body, nonce)

    @api.post("/sagas/{saga_id}/{action}", include_in_schema=False)
    async def act(request: Request, saga_id: str, action: str) -> Response:
        session = _session_of(request)
        form = await _form(request)
        if action not in _ACTIONS or not hmac.compare_digest(form.get("csrf", ""), session.csrf):
            return _refused("missing or wrong CSRF token")
        try:
            session.flash = (await _act(app, saga_id, action, form), True)
        except SagakitError as exc:
            session.flash = (f"{action} failed: {exc}", False)
        return RedirectResponse(pages.saga_url(saga_id), status_code=303)

    api.add_middleware(DashboardAuth, sessions=sessions)


async def _act(app: App, saga_id: str, action: str, form: dict[str, str]) -> str:
    if action == "retry":
        await app.retry(saga_id)
        return "Retry requested: the saga resumes."
    if action == "cancel":
        await app.cancel(saga_id, reason=form.get("reason", ""))
        return "Cancel requested: the saga compensates."
    if action == "resolve":
        await app.resolve(saga_id, form.get("note", ""))
        return "Resolved by hand: the saga ended failed."
    name = form.get("name", "").strip()
    if not name:
        raise ConfigurationError("a signal needs a name")
    try:
        payload = json.loads(form.get("payload") or "null")
    except ValueError as exc:
        raise ConfigurationError(f"the payload is not JSON: {exc}") from None
    sent = await app.signal(saga_id, name, payload)
    return f"Signal {name!r} sent." if sent else f"Signal {name!r} was already sent."
