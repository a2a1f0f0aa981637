"""The definition routes: the registered saga types and their graphs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from sagakit.api.errors import ApiError
from sagakit.api.models import INVALID, DefinitionOut, ErrorOut, GraphOut
from sagakit.app import App
from sagakit.definition import Saga
from sagakit.errors import ConfigurationError, UnknownSagaType
from sagakit.graph import graph_for


def definition_routes(app: App) -> APIRouter:
    """The routes under ``/api/definitions``, reading ``app``'s registered definitions."""
    router = APIRouter(prefix="/api/definitions", tags=["definitions"])

    @router.get("", response_model=list[DefinitionOut])
    async def list_definitions() -> list[DefinitionOut]:
        """Every registered saga type, at its latest version."""
        return [DefinitionOut.of(_latest(app, t)) for t in app.saga_types]

    @router.get(
        "/{saga_type}",
        response_model=DefinitionOut,
        responses={404: {"model": ErrorOut, "description": "No such saga type."}, **INVALID},
    )
    async def get_definition(saga_type: str) -> DefinitionOut:
        """One registered saga type, at its latest version."""
        return DefinitionOut.of(_latest(app, saga_type))

    @router.get(
        "/{saga_type}/graph",
        response_model=GraphOut,
        responses={
            404: {"model": ErrorOut, "description": "No such saga type or version."},
            409: {"model": ErrorOut, "description": "A code-first type with no run yet."},
            **INVALID,
        },
    )
    async def definition_graph(
        saga_type: str,
        version: Annotated[int | None, Query(ge=1)] = None,
        runs: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> GraphOut:
        """The saga type as a Mermaid flowchart: declarative types from their steps,
        code-first ones from their ``runs`` most recent recorded runs."""
        saga = _latest(app, saga_type) if version is None else app.definition(saga_type, version)
        if saga is None:
            detail = f"saga type {saga_type!r} has no version {version} registered"
            raise ApiError(404, "UnknownVersion", detail)
        try:
            text = await graph_for(app, saga_type, version=saga.version, runs=runs)
        except ConfigurationError as exc:
            # The type and version exist, so this is a code-first type with no run to draw.
            raise ApiError(409, "NoRecordedRuns", str(exc)) from exc
        return GraphOut(type=saga_type, version=saga.version, mermaid=text)

    return router


def _latest(app: App, saga_type: str) -> Saga:
    saga = app.definition(saga_type)
    if saga is None:
        # A type in the path names a resource: unknown is 404 here (422 only in a start body).
        raise ApiError(404, "UnknownSagaType", str(UnknownSagaType(saga_type, app.saga_types)))
    return saga
