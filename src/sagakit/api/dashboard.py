"""The dashboard: HTML pages served by the API's app, for people with a browser.

``GET /`` lists sagas a page at a time, newest first (counts by state, filters, newer/older
links, refreshed every 2 s without leaving the page shown), ``GET /sagas/{id}`` shows one
(summary, steps coloured by state, timeline, Mermaid source) with forms to retry, resolve,
cancel or signal it. None of these routes is in the OpenAPI document.

A browser cannot send the bearer header, so the dashboard logs in instead: ``POST /login``
with the API token sets a signed, stateless session cookie (see :mod:`sagakit.api.auth` for
what it holds, how long it lasts and what logging out can and cannot do). Dashboard paths
accept only that cookie; API paths keep requiring the bearer header
(:class:`~sagakit.api.auth.BearerAuth` leaves the dashboard's paths to this module). Every POST
must carry the session's CSRF token, and is refused when its ``Origin`` (or ``Sec-Fetch-Site``)
says it came from another site; pages may not be framed.

Without a token (``--insecure``) ``GET /login`` logs in without asking; the whole server then
answers only requests addressed to a loopback name (``localhost``, ``127.0.0.1``, ``[::1]``;
:class:`~sagakit.api.auth.LoopbackOnly`), so a page of another site whose name its DNS re-points
at 127.0.0.1 is refused rather than logged in.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from sagakit.api import pages
from sagakit.api.auth import FLASH_SECONDS, SESSION_SECONDS, Session, SessionCookies
from sagakit.codec import text_problem
from sagakit.errors import ConfigurationError, SagakitError, SagaNotFound
from sagakit.graph import graph_for
from sagakit.journal import ACTIVE, SagaState
from sagakit.timeline import timeline

if TYPE_CHECKING:
    from sagakit.app import App

COOKIE = "sagakit_session"
FLASH_COOKIE = "sagakit_flash"
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
_PATHS = re.compile(r"^/(?:login|logout)?$|^/sagas/[^/]+(?:/(?:retry|cancel|resolve|signal))?$")
_ACTIONS = ("retry", "cancel", "resolve", "signal")


def is_dashboard_path(path: str) -> bool:
    """Whether ``path`` is one of the dashboard's (cookie auth) rather than the API's."""
    return _PATHS.match(path) is not None


class DashboardAuth:
    """On dashboard paths: a valid session cookie is required (else a redirect to the login
    page, or 403 for a POST) and a POST from another origin is refused; with
    :class:`~sagakit.api.auth.LoopbackOnly` guards the whole server when there is no token."""

    def __init__(self, app: ASGIApp, *, cookies: SessionCookies) -> None:
        self.app = app
        self._cookies = cookies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_dashboard_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal: Response | None = None
        if request.method == "POST" and not _same_origin(request):
            refusal = _refused("cross-site request refused")
        elif scope["path"] != "/login":
            session = self._cookies.check(request.cookies.get(COOKIE))
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


def _session_of(request: Request) -> Session:
    session: Session = request.state.session
    return session


def _csrf_ok(form: dict[str, str], session: Session) -> bool:
    return hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode())


def _set_cookie(response: Response, request: Request, name: str, value: str, age: int) -> None:
    response.set_cookie(name, value, max_age=age, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")  # fmt: skip


def _clear_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(name, path="/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")  # fmt: skip


def _login_routes(api: FastAPI, cookies: SessionCookies, token: str | None) -> None:
    secret = None if token is None else token.encode()

    def logged_in(request: Request) -> Response:
        response = RedirectResponse("/", status_code=303)
        _set_cookie(response, request, COOKIE, cookies.issue(), SESSION_SECONDS)
        return response

    @api.get("/login", include_in_schema=False)
    async def login_form(request: Request) -> Response:
        if secret is None:
            return logged_in(request)
        nonce = secrets.token_urlsafe(16)
        return _html(pages.login_page(nonce=nonce, failed=False), nonce)

    @api.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        given = (await _form(request)).get("token", "").strip().encode()
        if secret is None or hmac.compare_digest(given, secret):
            return logged_in(request)
        nonce = secrets.token_urlsafe(16)
        return _html(pages.login_page(nonce=nonce, failed=True), nonce, 401)

    @api.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        if not _csrf_ok(await _form(request), _session_of(request)):
            return _refused("missing or wrong CSRF token")
        # The cookie is stateless: this browser forgets it, but a copy stays valid until it
        # expires (or the API token is rotated).
        response = RedirectResponse("/login", status_code=303)
        _clear_cookie(response, request, COOKIE)
        return response


def _bounded(text: str | None, default: int, low: int, high: int) -> int:
    try:
        value = int(text) if text else default
    except ValueError:
        return default
    return min(max(value, low), high)


def _total(counts: dict[str, int], state: str | None) -> int:
    """How many sagas match the filters, from the counts by state of the type filtered on."""
    return counts.get(state, 0) if state else sum(counts.values())


def create_dashboard(api: FastAPI, app: App, token: str | None) -> None:
    """Add the dashboard's routes and its cookie-auth middleware to ``api``.

    With ``token=None`` (``--insecure``) the login page opens a session without asking."""
    cookies = SessionCookies(token)
    _login_routes(api, cookies, token)

    @api.get("/", include_in_schema=False)
    async def saga_list(request: Request) -> Response:
        query = request.query_params
        state = query.get("state") or None
        saga_type = query.get("type") or None
        if state is not None and state not in {s.value for s in SagaState}:
            state = None
        limit = _bounded(query.get("limit"), PAGE_SIZE, 1, MAX_PAGE_SIZE)
        offset = _bounded(query.get("offset"), 0, 0, 10**9)
        # One row more than shown says whether an older page exists.
        rows = await app.list(state=state, saga_type=saga_type, limit=limit + 1, offset=offset)
        sagas, more = rows[:limit], len(rows) > limit
        counts = {} if saga_type and text_problem(saga_type) else await app.store.counts(saga_type)
        where = pages.Where(state=state, saga_type=saga_type, limit=limit, default=PAGE_SIZE)
        paging = pages.paging(where, offset=offset, shown=len(sagas), more=more,
                              total=_total(counts, state))  # fmt: skip
        fragment = pages.list_fragment(counts, sagas, paging, saga_type=saga_type)
        nonce = secrets.token_urlsafe(16)
        if query.get("fragment"):
            return _html(fragment, nonce)
        types = sorted({*app.saga_types, *([saga_type] if saga_type else [])})
        body = pages.list_page(fragment, types=types, where=where, nonce=nonce,
                               csrf=_session_of(request).csrf)  # fmt: skip
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
        flash_cookie = request.cookies.get(FLASH_COOKIE)
        body = pages.saga_page(
            info,
            rows=timeline(entries, active=info.state in ACTIVE),
            start=entries[0].at if entries else 0.0,
            steps=pages.flow(app.definition(info.saga_type, info.version), entries),
            mermaid=graph,
            csrf=_session_of(request).csrf,
            flash=cookies.read_flash(flash_cookie, saga_id),
            nonce=nonce,
        )
        response = _html(body, nonce)
        if flash_cookie is not None:  # shown once
            _clear_cookie(response, request, FLASH_COOKIE)
        return response

    @api.post("/sagas/{saga_id}/{action}", include_in_schema=False)
    async def act(request: Request, saga_id: str, action: str) -> Response:
        form = await _form(request)
        if action not in _ACTIONS or not _csrf_ok(form, _session_of(request)):
            return _refused("missing or wrong CSRF token")
        try:
            text, ok = await _act(app, saga_id, action, form), True
        except SagakitError as exc:
            text, ok = f"{action} failed: {exc}", False
        response = RedirectResponse(pages.saga_url(saga_id), status_code=303)
        flash = cookies.flash(saga_id, text, ok)
        _set_cookie(response, request, FLASH_COOKIE, flash, FLASH_SECONDS)
        return response

    api.add_middleware(DashboardAuth, cookies=cookies)


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
    sent = await app.signal(saga_id, name, payload, signal_id=form.get("signal_id") or None)
    return f"Signal {name!r} sent." if sent else f"Signal {name!r} was already sent."
