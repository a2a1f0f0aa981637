"""The saga routes: start, get, list, timeline, signal, cancel, retry and resolve."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response, status

from sagakit.api.models import (
    INVALID,
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
    Text,
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
# Beyond any store's size, and within the signed 64-bit OFFSET that the databases take.
MAX_OFFSET = 10**18

SagaId = Annotated[Text, Path(description="The saga's id.")]


def saga_routes(app: App) -> APIRouter:
    """The routes under ``/api/sagas``, acting on ``app``."""
    router = APIRouter(prefix="/api/sagas", tags=["sagas"], responses=INVALID)

    @router.post(
        "",
        status_code=status.HTTP_201_CREATED,
        response_model=StartOut,
        responses={200: {"model": StartOut, "description": "The key had started it already."}},
    )
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
        saga_type: Annotated[Text | None, Query(alias="type")] = None,
        state: SagaState | None = None,
        created_since: Annotated[
            datetime | None, Query(description="ISO 8601; without a zone, the server's.")
        ] = None,
        saga_id: Annotated[Text | None, Query(alias="id")] = None,
        idempotency_key: Text | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> SagaPage:
        """Sagas, newest first, filtered by type, state, creation time, id or idempotency key."""
        since = None if created_since is None else _zoned(created_since)
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
    async def get_saga(saga_id: SagaId) -> SagaDetailOut:
        """One saga, with its input and output."""
        return SagaDetailOut.of(await app.get(saga_id))

    @router.get("/{saga_id}/timeline", response_model=TimelineOut, responses=_NOT_FOUND)
    async def saga_timeline(saga_id: SagaId) -> TimelineOut:
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
    async def signal_saga(saga_id: SagaId, body: SignalRequest) -> SignalOut:
        """Send the saga a signal; it is stored now and delivered when the saga waits for it."""
        sent = await app.signal(saga_id, body.name, body.payload, signal_id=body.signal_id)
        return SignalOut(saga_id=saga_id, name=body.name, sent=sent)

    @router.post(
        "/{saga_id}/cancel",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=SagaOut,
        responses={**_NOT_FOUND, **_WRONG_STATE},
    )
    async def cancel_saga(saga_id: SagaId, body: CancelRequest | None = None) -> SagaOut:
        """Cancel the saga: it compensates the steps it completed and ends cancelled."""
        await app.cancel(saga_id, reason=body.reason if body is not None else "")
        return SagaOut.of(await app.get(saga_id))

    @router.post(
        "/{saga_id}/retry",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=SagaOut,
        responses={**_NOT_FOUND, **_WRONG_STATE},
    )
    async def retry_saga(saga_id: SagaId) -> SagaOut:
        """Resume a saga in needs_attention, after its cause was fixed."""
        await app.retry(saga_id)
        return SagaOut.of(await app.get(saga_id))

    @router.post(
        "/{saga_id}/resolve",
        response_model=SagaOut,
        responses={**_NOT_FOUND, **_WRONG_STATE},
    )
    async def resolve_saga(saga_id: SagaId, body: ResolveRequest) -> SagaOut:
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
            found = await app.get(saga_id)
        except SagaNotFound:
            return []
    elif key is not None:
        await app.open()  # the store is read directly; a no-op once open
        record = await app.store.by_idempotency_key(key)
        if record is None:
            return []
        found = SagaInfo.of(record)
    else:
        return []
    passes = (
        (key is None or found.idempotency_key == key)
        and (state is None or found.state is state)
        and (saga_type is None or found.saga_type == saga_type)
    )
    return [found] if passes else []


def _zoned(moment: datetime) -> datetime:
    """``moment`` with a zone: the server's if it has none."""
    if moment.tzinfo is not None:
        return moment
    try:
        return moment.astimezone()
    except (OverflowError, ValueError, OSError):
        # Year 1 or 9999, where the local zone's rules run out: an hour either way is moot.
        return moment.replace(tzinfo=UTC)
