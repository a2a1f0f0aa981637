"""What callers get back: SagaInfo (a saga's state) and SagaHandle (a started saga)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sagakit.codec import decode
from sagakit.errors import SagaFailed
from sagakit.journal import SagaState
from sagakit.store.base import WAIT_FOREVER, SagaRecord

if TYPE_CHECKING:
    from sagakit.app import App


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaInfo:
    """A saga as ``app.get`` and ``app.list`` report it.

    ``input`` and ``output`` are decoded when read, so a saga whose stored payload is corrupt
    can still be listed and shown; reading the payload then raises
    :class:`~sagakit.errors.CorruptPayload`. ``raw_input`` and ``raw_output`` are the JSON text.
    """

    id: str
    saga_type: str
    version: int
    state: SagaState
    idempotency_key: str | None
    raw_input: str | None
    raw_output: str | None
    error: dict[str, Any] | None
    current_step: str | None
    created_at: datetime
    updated_at: datetime
    deadline: datetime | None
    parent_id: str | None = None  # the saga that started this one as a child
    waiting: bool = False  # unloaded while it waits for a timer, a signal or a child saga
    wake_at: datetime | None = None  # when that wait times out, if it does

    @property
    def input(self) -> Any:
        return decode(self.raw_input)

    @property
    def output(self) -> Any:
        return decode(self.raw_output)

    @classmethod
    def of(cls, r: SagaRecord) -> SagaInfo:
        return cls(
            id=r.id,
            saga_type=r.saga_type,
            version=r.version,
            state=r.state,
            idempotency_key=r.idempotency_key,
            raw_input=r.input,
            raw_output=r.output,
            error=r.error,
            current_step=r.current_step,
            created_at=_local(r.created_at),
            updated_at=_local(r.updated_at),
            deadline=None if r.deadline is None else _local(r.deadline),
            parent_id=r.parent_id,
            waiting=r.wake_at is not None,
            wake_at=None if r.wake_at is None or r.wake_at >= WAIT_FOREVER else _local(r.wake_at),
        )


def _local(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp).astimezone()


class SagaHandle:
    """A started saga. ``created`` is False when ``start`` found an existing saga for the
    idempotency key."""

    def __init__(self, app: App, saga_id: str, *, created: bool = False) -> None:
        self.app = app
        self.id = saga_id
        self.created = created

    def __repr__(self) -> str:
        return f"SagaHandle({self.id!r})"

    async def status(self) -> SagaInfo:
        return await self.app.get(self.id)

    async def signal(self, name: str, payload: Any = None, *, signal_id: str | None = None) -> bool:
        """Send the saga a signal; see :meth:`App.signal`."""
        return await self.app.signal(self.id, name, payload, signal_id=signal_id)

    async def cancel(self, reason: str = "") -> None:
        """Cancel the saga; see :meth:`App.cancel`."""
        await self.app.cancel(self.id, reason=reason)

    async def result(self, timeout: float | None = None) -> Any:
        """Wait until the saga stops moving and return its output.

        Raises:
            SagaFailed: it ended failed, cancelled or in needs_attention (``.state`` says which).
            TimeoutError: ``timeout`` seconds passed first.
        """
        async with asyncio.timeout(timeout):
            outcome = await self.app.outcome(self.id)
        if outcome.state is SagaState.COMPLETED:
            return decode(outcome.output)
        raise SagaFailed(self.id, outcome.state, outcome.error)
