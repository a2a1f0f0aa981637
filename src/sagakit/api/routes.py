"""The saga routes: start, get, list, timeline, signal, cancel, retry and resolve."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status

from sagakit.api.models import (
    CancelRequest,
    EntryOut,
    ErrorOut,
    ResolveRequest,
    RowOut,
    SagaDetailOut,
    SagaOut,
    SagaPage,
    SignalOut,
    SignalRequest,
    StartOut,
    StartRequest,
    TimelineOut,
)
from sagakit.app import App
from sagakit.errors import SagaNotFound
from sagakit.handle import SagaInfo
from sagakit.journal import ACTIVE, SagaState
from sagakit.timeline import timeline

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "No saga has this id."}
}
_WRONG_STATE: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "The saga is in the wrong state."}
}
_SCAN_PAGE = 500  # sagas read per query while looking for an idempotency key


def saga_routes(app: App) -> APIRouter:
    """The routes under ``/api/sagas``, acting on ``app``."""
    router = APIRouter(prefix="/api/sagas", tags=["sagas"])

    @router.post("", status_code=status.HTTP_201_CREATED, response_model=StartOut)
    async def start_saga(body: StartRequest, response: Response) -> StartOut:
        """Start a saga. A start with an idempotency key already used returns that saga with
        200 and ``created: false``, and starts nothing."""
        handle = await app.start(
            body.type, body.data, idempotency_key=body.idempotency_key, deadline=body.deadline
        )
        if not handle.created:
            response.status_code = status.HTTP_200_OK
        info = SagaDetailOut.of(await app.get(handle.id))
        return StartOut(**info.model_dump(), created=handle.created)

    @router.get("", response_model=SagaPage)
    async def list_sagas(
        *,
        saga_type: Annotated[str | None, Query(alias="type")] = None,
        state: SagaState | None = None,
        created_since: Annotated[
            datetime | None, Query(description="ISO 8601; without a zone, the server's.")
        ] = None,
        saga_id: Annotated[str | None, Query(alias="id")] = None,
        idempotency_key: str | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> SagaPage:
        """Sagas, newest first, filtered by type, state, creation time, id or idempotency key."""
        since = None if created_since is None else created_since.astimezone()
        if saga_id is not None or idempotency_key is not None:
            found = await _lookup(app, saga_id, idempotency_key, state, saga_type)
            rows = [i for i in found if since is None or i.created_at >= since]
            page = rows[offset : offset + limit]
            more = len(rows) > offset + limit
        else:
            listed = await app.list(state=state, saga_type=saga_type, limit=limit, offset=offset)
            # Newest first, so the sagas created since a time are a prefix of the listing.
            page = [i for i in listed if since is None or i.created_at >= since]
            more = len(page) == limit
        return SagaPage(
            items=[SagaOut.of(i) for i in page],
            limit=limit,
            offset=offset,
            next_offset=offset + limit if more else None,
        )

    @router.get("/{saga_id}", response_model=SagaDetailOut, responses=_NOT_FOUND)
    async def get_saga(saga_id: str) -> SagaDetailOut:
        """One saga, with its input and output."""
        return SagaDetailOut.of(await app.get(saga_id))

    @router.get("/{saga_id}/timeline", response_model=TimelineOut, responses=_NOT_FOUND)
    async def saga_timeline(saga_id: str) -> TimelineOut:
        """The saga's journal, and its attempts and events as timeline rows."""
        entries = await app.journal(saga_id)
        info = await app.get(saga_id)
        return TimelineOut(
            saga_id=saga_id,
            state=info.state,
            rows=[RowOut.of(r) for r in timeline(entries, active=info.state in ACTIVE)],
            journal=[EntryOut.of(e) for e in entries],
        )

    @router.post(
        "/{saga_id}/signals",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=SignalOut,
        responses={**_NOT_FOUND, **_WRONG_STATE},
    )
    async def signal_saga(saga_id: str, body: SignalRequest) -> SignalOut:
        """Send the saga a signal; it is stored now and delivered when the saga waits for it."""
        sent = await app.signal(saga_id, body.name, body.payload, signal_id=body.signal_id)
        return SignalOut(saga_id=saga_id, name=body.name, sent=sent)

    @router.post(
        "/{saga_id}/cancel",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=SagaOut,
        responses={**_NOT_FOUND, **_WRONG_STATE},
    )
    async def cancel_saga(saga_id: str, body: CancelRequest | None = None) -> SagaOut:
        """Cancel the saga: it compensates the steps it completed and ends cancelled."""
        await app.cancel(saga_id, reason=body.reason if body is not None else "")
        return SagaOut.of(await app.get(saga_id))

    @router.post(
        "/{saga_id}/retry",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=SagaOut,
        responses={**_NOT_FOUND, **_WRONG_STATE},
    )
    async def retry_saga(saga_id: str) -> SagaOut:
        """Resume a saga in needs_attention, after its cause was fixed."""
        await app.retry(saga_id)
        return SagaOut.of(await app.get(saga_id))

    @router.post(
        "/{saga_id}/resolve",
        response_model=SagaOut,
        responses={**_NOT_FOUND, **_WRONG_STATE},
    )
    async def resolve_saga(saga_id: str, body: ResolveRequest) -> SagaOut:
        """Record that a saga in needs_attention was settled by hand; it ends failed."""
        return SagaOut.of(await app.resolve(saga_id, body.note))

    return router


async def _lookup(
    app: App,
    saga_id: str | None,
    key: str | None,
    state: SagaState | None,
    saga_type: str | None,
) -> list[SagaInfo]:
    """The saga with this id and/or idempotency key that passes the filters (at most one)."""
    if saga_id is not None:
        try:
            found = [await app.get(saga_id)]
        except SagaNotFound:
            return []
        return [
            i
            for i in found
            if (key is None or i.idempotency_key == key)
            and (state is None or i.state is state)
            and (saga_type is None or i.saga_type == saga_type)
        ]
    # The store has no query by idempotency key, so this reads the listing page by page.
    # TODO(issue 6): a Store lookup by key would make this one indexed query.
    offset = 0
    while batch := await app.list(
        state=state, saga_type=saga_type, limit=_SCAN_PAGE, offset=offset
    ):
        for info in batch:
            if info.idempotency_key == key:
                return [info]
        offset += _SCAN_PAGE
    return []
