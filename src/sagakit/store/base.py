"""The Store protocol: the only thing the engine knows about databases."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sagakit.journal import Entry, SagaState


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaRecord:
    """A saga row: the projection of its journal, plus what it was started with."""

    id: str
    saga_type: str
    version: int
    state: SagaState
    idempotency_key: str | None
    input: str | None
    output: str | None
    error: dict[str, Any] | None
    current_step: str | None
    deadline: float | None
    created_at: float
    updated_at: float


# Given a saga's row and journal, the entries to append (or raise to append nothing).
Decide = Callable[[SagaRecord, list[Entry]], Sequence[Entry]]


class Store(Protocol):
    """Durable storage of saga rows and journals.

    ``append`` returns once the entries are durable; ``append_soon`` queues entries behind
    which any later ``append`` of the same store commits, without waiting (ordering is kept).
    """

    location: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, record: SagaRecord, first: Entry) -> tuple[SagaRecord, bool]:
        """Insert a saga and its first entry; for a used idempotency key return the existing
        saga and False instead."""
        ...

    async def append(self, saga_id: str, entries: Sequence[Entry]) -> None: ...

    def append_soon(self, saga_id: str, entries: Sequence[Entry]) -> None: ...

    async def append_checked(self, saga_id: str, decide: Decide) -> SagaRecord:
        """Read the saga and its journal, append what ``decide`` returns, in one transaction
        (for operator actions, which race with each other); return the updated row.

        Raises:
            SagaNotFound: no such saga.
        """
        ...

    async def get(self, saga_id: str) -> SagaRecord | None: ...

    async def journal(self, saga_id: str) -> list[Entry]: ...

    async def list_sagas(
        self,
        *,
        state: SagaState | None = None,
        saga_type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[SagaRecord]: ...

    async def active(
        self, *, limit: int = 500, after: tuple[float, str] | None = None
    ) -> list[SagaRecord]:
        """Sagas that are started, running or compensating, oldest first; ``after`` is the
        (created_at, id) of the last saga of the previous page."""
        ...

    async def counts(self) -> dict[str, int]:
        """Number of sagas in each state."""
        ...
