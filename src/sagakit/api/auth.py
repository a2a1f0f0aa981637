"""Bearer-token auth for every request the API receives, and its entry in the OpenAPI document.

The check is ASGI middleware rather than a FastAPI dependency: a dependency runs after the
request body is parsed, so a malformed body would get a 422 before an unauthenticated caller
got its 401; the middleware refuses first, on every path (unknown ones too).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

SCHEME = "bearerAuth"


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
