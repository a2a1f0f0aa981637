"""The two ways in to ``sagakit serve``: a bearer token for programs, a signed cookie for people.

**Programs** (``/api/...``, ``/openapi.json``, ``/metrics``) send ``Authorization: Bearer
<token>`` on every request. :class:`BearerAuth` checks it as ASGI middleware rather than as a
FastAPI dependency: a dependency runs after the request body is parsed, so a malformed body
would get a 422 before an unauthenticated caller got its 401; the middleware refuses first, on
every path (unknown ones too) except the dashboard's.

**People** use the dashboard (``/``, ``/sagas/...``), which a browser cannot send a header to.
They log in once by posting the same token to ``/login`` and get a session cookie (HttpOnly,
SameSite=Strict, Secure when served over https) that :class:`SessionCookies` signs and checks:
``v1.<expires>.<nonce>.<mac>``, the MAC an HMAC-SHA256 over the rest under a key derived from
the token with its own label. The server keeps no session state, so a session survives a
restart and works on every process serving the same token; and it follows that

- a session ends when its expiry (12 h after login) passes: the expiry is inside the MAC;
- logging out clears the cookie in that browser but cannot revoke a copy of it, which stays
  valid until it expires;
- rotating the API token revokes every session at once, since their key derives from it.

Every dashboard form carries a CSRF token, an HMAC of the session cookie under a second derived
key, so a page of another site can neither read it nor make one up; the dashboard also refuses a
POST whose ``Origin`` or ``Sec-Fetch-Site`` says it came from another site. The result of an
action, shown once on the next page, travels in a short-lived cookie signed under a third key.

Behind a reverse proxy that terminates TLS, the cookie gets its Secure flag only when the proxy
sends ``X-Forwarded-Proto: https`` and uvicorn trusts it (``--forwarded-allow-ips``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

SCHEME = "bearerAuth"
SESSION_SECONDS = 12 * 3600
FLASH_SECONDS = 60
_VERSION = "v1"
_CLOCK_SKEW = 60.0  # an expiry further ahead than a fresh session's was not issued by us


class BearerAuth:
    """Refuse every HTTP request whose ``Authorization`` header is not ``Bearer <token>``,
    except on the paths ``exempt`` accepts (the dashboard's, which check a session cookie)."""

    def __init__(
        self, app: ASGIApp, *, token: str, exempt: Callable[[str], bool] | None = None
    ) -> None:
        self.app = app
        self._token = token.encode()
        self._exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not (self._exempt and self._exempt(scope["path"])):
            problem = self._problem(dict(scope["headers"]).get(b"authorization"))
            if problem is not None:
                response = JSONResponse(
                    {"error": "Unauthorized", "detail": problem},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, header: bytes | None) -> str | None:
        if header is None:
            return "missing bearer token; send the header 'Authorization: Bearer <token>'"
        scheme, _, given = header.partition(b" ")
        # compare_digest takes as long for a wrong token as for a nearly right one.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._token):
            return "invalid bearer token"
        return None


def document_bearer(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare in an OpenAPI document that every operation needs the bearer token."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[SCHEME] = {"type": "http", "scheme": "bearer"}
    schema["security"] = [{SCHEME: []}]
    return schema


# -- the dashboard's session cookie -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """A checked session cookie: its value, when it expires and the CSRF token of its forms."""

    cookie: str
    expires: float
    csrf: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionCookies:
    """Issues and checks the dashboard's signed session cookies, holding no state.

    Args:
        token: the API token the keys derive from; ``None`` (``--insecure``) draws a random
            key per process instead, so sessions end with the process.
    """

    def __init__(self, token: str | None) -> None:
        root = secrets.token_bytes(32) if token is None else token.encode()
        self._session_key = _derive(root, b"sagakit dashboard session v1")
        self._csrf_key = _derive(root, b"sagakit dashboard csrf v1")
        self._flash_key = _derive(root, b"sagakit dashboard flash v1")

    def issue(self, *, now: float | None = None) -> str:
        """A new session's cookie value, valid for :data:`SESSION_SECONDS` from ``now``."""
        at = time.time() if now is None else now
        body = f"{_VERSION}.{int(at + SESSION_SECONDS)}.{secrets.token_urlsafe(16)}"
        return f"{body}.{self._mac(self._session_key, body)}"

    def check(self, cookie: str | None, *, now: float | None = None) -> Session | None:
        """The session of ``cookie`` if it is ours, unaltered and unexpired, else None."""
        if not cookie or len(cookie) > 256:
            return None
        body, _, mac = cookie.rpartition(".")
        # compare_digest: how long the check takes says nothing of how close a forgery came.
        if not hmac.compare_digest(mac.encode(), self._mac(self._session_key, body).encode()):
            return None
        parts = body.split(".")
        if len(parts) != 3 or parts[0] != _VERSION or not parts[1].isdigit():
            return None
        expires, at = float(parts[1]), time.time() if now is None else now
        if not at < expires <= at + SESSION_SECONDS + _CLOCK_SKEW:
            return None
        return Session(cookie=cookie, expires=expires, csrf=self._mac(self._csrf_key, cookie))

    def flash(self, saga_id: str, text: str, ok: bool) -> str:
        """A cookie value carrying an action's outcome to the next page of ``saga_id``."""
        # A cookie holds about 4 KB; an error message longer than this is cut.
        brief = text if len(text) <= 300 else text[:300] + "…"
        expires = int(time.time() + FLASH_SECONDS)
        payload = _b64(json.dumps([saga_id, brief, ok, expires]).encode())
        return f"{payload}.{self._mac(self._flash_key, payload)}"

    def read_flash(self, cookie: str | None, saga_id: str) -> tuple[str, bool] | None:
        """(text, ok) of a flash cookie meant for ``saga_id``'s page, if signed and fresh."""
        payload, _, mac = (cookie or "").rpartition(".")
        if not payload or not hmac.compare_digest(
            mac.encode(), self._mac(self._flash_key, payload).encode()
        ):
            return None
        for_id, text, ok, expires = json.loads(_unb64(payload))
        if for_id != saga_id or expires < time.time():
            return None
        return str(text), bool(ok)

    @staticmethod
    def _mac(key: bytes, message: str) -> str:
        return _b64(hmac.new(key, message.encode(), hashlib.sha256).digest())


def _derive(root: bytes, label: bytes) -> bytes:
    """A key for one purpose: HMAC-SHA256 keyed by the root secret over a label no other
    purpose uses, so a MAC made for one (a CSRF token, say) never passes as another."""
    return hmac.new(root, label, hashlib.sha256).digest()


class LoopbackOnly:
    """Without a token (``sagakit serve --insecure`` on a loopback address): refuse, with 403,
    every request addressed to a name that is not a loopback one. A page of another site that
    re-points its own name at 127.0.0.1 (DNS rebinding) would otherwise reach the API from the
    user's browser; its requests carry that site's name in ``Host``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not addressed_to_loopback(Request(scope)):
            refusal = JSONResponse(
                {"error": "forbidden",
                 "detail": "without a token this server answers only at localhost, 127.0.0.1 "
                           "or [::1]; serve with a token to be reached by another name"},
                status_code=403,
            )  # fmt: skip
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def addressed_to_loopback(request: Request) -> bool:
    """Whether the request's ``Host`` names a loopback address (or localhost)."""
    host = request.headers.get("host")
    if host is None:
        return True  # HTTP/1.0 without a Host: no browser, so no page of another site
    name = host[1 : host.find("]")] if host.startswith("[") else host.partition(":")[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
