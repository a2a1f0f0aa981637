"""The deploy-safety check: would the registered code resume every unfinished saga?

``sagakit check --app module:app`` (or ``await check(app)``) replays the journal of every
started, running, compensating and needs_attention saga against the definitions the App
registers, writing nothing, and lists those that would break: a definition or version that is
not registered, an input that no longer decodes, or a workflow that now calls different steps
than its journal recorded. Run it with the new code before rolling it out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sagakit.app import App
from sagakit.codec import decode
from sagakit.engine import SagaRun
from sagakit.errors import PayloadError
from sagakit.journal import ACTIVE, SagaState
from sagakit.store.base import SagaRecord

_UNFINISHED = (*sorted(ACTIVE), SagaState.NEEDS_ATTENTION)


@dataclass(frozen=True, slots=True, kw_only=True)
class Breakage:
    """A saga the registered code would not resume, and why."""

    saga_id: str
    saga_type: str
    version: int
    state: SagaState
    reason: str


async def _unfinished(app: App, page: int = 500) -> AsyncIterator[SagaRecord]:
    for state in _UNFINISHED:
        offset = 0
        while True:
            found = await app.store.list_sagas(state=state, limit=page, offset=offset)
            for record in found:
                yield record
            if len(found) < page:
                break
            offset += page


async def unfinished_count(app: App) -> int:
    """How many sagas :func:`check` would replay."""
    await app.open_for_reading()
    counts = await app.store.counts()
    return sum(counts.get(state.value, 0) for state in _UNFINISHED)


async def check(
    app: App, *, progress: Callable[[int], None] | None = None
) -> tuple[int, list[Breakage]]:
    """Replay every unfinished saga of ``app``'s database against its registered code;
    return how many were checked and those that would break. ``progress(1)`` is called
    after each saga."""
    await app.open_for_reading()
    checked, broken = 0, []
    async for record in _unfinished(app):
        checked += 1
        reason = await _why_broken(app, record)
        if reason is not None:
            broken.append(Breakage(saga_id=record.id, saga_type=record.saga_type,
                                   version=record.version, state=record.state,
                                   reason=reason))  # fmt: skip
        if progress is not None:
            progress(1)
    return checked, broken


async def _why_broken(app: App, record: SagaRecord) -> str | None:
    saga = app.definition(record.saga_type, record.version)
    if saga is None:
        return f"saga type {record.saga_type!r} version {record.version} is not registered"
    try:
        data = decode(record.input, saga.input_type)
    except PayloadError as exc:
        return f"its input no longer decodes: {exc}"
    run = SagaRun(
        store=app.store,
        saga=saga,
        saga_id=record.id,
        data=data,
        deadline=record.deadline,
        journal=await app.store.journal(record.id),
    )
    problem = await run.replay()
    return None if problem is None else str(problem)
