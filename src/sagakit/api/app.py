"""The FastAPI application of ``sagakit serve``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.responses import JSONResponse, Response

from sagakit.api.auth import BearerAuth, LoopbackOnly, document_bearer
from sagakit.api.dashboard import create_dashboard, is_dashboard_path
from sagakit.api.definitions import definition_routes
from sagakit.api.errors import install_error_handlers
from sagakit.api.routes import saga_routes
from sagakit.app import App
from sagakit.errors import ConfigurationError

if TYPE_CHECKING:
    from sagakit.observability.metrics import Metrics

OPENAPI_PATH = "/openapi.json"


def create_api(app: App, *, token: str | None, metrics: Metrics | None = None) -> FastAPI:
    """A FastAPI app serving ``app``'s sagas and definitions under ``/api``.

    The caller opens and closes ``app``. Every request needs ``Authorization: Bearer
    <token>``; ``token=None`` turns auth off, which ``sagakit serve`` allows only with
    ``--insecure`` on a loopback address, and then every request must be addressed to a
    loopback name (``Host``), else 403. The OpenAPI document is at ``/openapi.json``,
    behind the same token; there is no interactive docs page, since a browser cannot send
    the token when it loads one.

    With ``metrics`` (a :class:`~sagakit.observability.Metrics` the App also runs as
    middleware), ``GET /metrics`` serves a Prometheus scrape, its store figures read afresh.

    Raises:
        ConfigurationError: ``token`` is empty or only whitespace.
    """
    if token is not None and not token.strip():
        raise ConfigurationError("the API token is empty; set a non-empty secret token")
    api = FastAPI(
        title="sagakit",
        summary="Start, inspect and operate durable sagas.",
        openapi_url=None,  # served below, behind the token like every other route
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(api)
    api.include_router(saga_routes(app))
    api.include_router(definition_routes(app))

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = FastAPI.openapi(api)
            api.openapi_schema = schema if token is None else _with_auth(schema)
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]

    if metrics is not None:

        @api.get("/metrics", include_in_schema=False)
        async def scrape() -> Response:
            await metrics.refresh(app)
            body, content_type = metrics.exposition()
            return Response(content=body, media_type=content_type)

    @api.get(OPENAPI_PATH, include_in_schema=False)
    async def openapi_document() -> JSONResponse:
        return JSONResponse(api.openapi())

    create_dashboard(api, app, token)  # HTML pages at / and /sagas/{id}, behind a login cookie
    if token is not None:
        api.add_middleware(BearerAuth, token=token, exempt=is_dashboard_path)
    else:  # --insecure: only this machine's own names, against DNS rebinding
        api.add_middleware(LoopbackOnly)
    return api


def _with_auth(schema: dict[str, Any]) -> dict[str, Any]:
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.setdefault("responses", {})["401"] = {
                "description": "Missing or invalid bearer token."
            }
    return document_bearer(schema)
