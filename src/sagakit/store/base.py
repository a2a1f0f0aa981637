"""The Store protocol: the only thing the engine knows about databases."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sagakit.journal import SUSPECT_AFTER, Entry, SagaState


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaRecord:
    """A saga row: the projection of its journal, plus what it was started with and who
    executes it: ``owner``, a worker id; ``recoveries``, how often in a row it was taken over
    from a worker that died before it got further; ``takeovers``, how often in all."""

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
    owner: str | None = None
    recoveries: int = 0
    takeovers: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Claimed:
    """A saga a worker took over, with its journal."""

    record: SagaRecord
    journal: list[Entry]


@dataclass(frozen=True, slots=True, kw_only=True)
class TypeCap:
    """How many more sagas of one type a claim may take: at most ``worker`` (this worker's
    room), and no more than keep the type's sagas in flight across all workers within
    ``cluster`` (None: no cluster-wide cap)."""

    cluster: int | None
    worker: int


# Given a saga's row and journal, the entries to append (or raise to append nothing).
Decide = Callable[[SagaRecord, list[Entry]], Sequence[Entry]]


def new_worker_id() -> str:
    """A worker id that names the host and process, unique across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Store(Protocol):
    """Durable storage of saga rows and journals, and who executes which saga.

    ``append`` returns once the entries are durable; ``append_soon`` queues entries behind
    which any later ``append`` of the same store commits, without waiting (ordering is kept).
    Both are fenced: they raise :class:`~sagakit.errors.FencedOut` (and write nothing) unless
    this store's worker still owns the saga.
    """

    location: str
    worker_id: str

    async def open(self) -> None:
        """Connect, and create or migrate the schema."""
        ...

    async def close(self) -> None: ...

    async def start_worker(self, wake: Callable[[], None]) -> None:
        """Become a worker that executes sagas; ``wake`` is called when there may be sagas to
        claim (a new saga, a retry, a worker that died)."""
        ...

    def lease_held(self) -> bool:
        """Whether this worker's lease is surely still valid (False when in doubt: the engine
        then makes its next write durable, which the fence checks)."""
        ...

    async def stop_worker(self) -> None:
        """Stop being a worker: commit what is queued and release the sagas still owned, so
        another worker can claim them at once."""
        ...

    async def create(self, record: SagaRecord, first: Entry) -> tuple[SagaRecord, bool]:
        """Insert a saga and its first entry; for a used idempotency key return the existing
        saga and False instead."""
        ...

    async def append(self, saga_id: str, entries: Sequence[Entry]) -> None: ...

    def append_soon(self, saga_id: str, entries: Sequence[Entry]) -> None: ...

    async def append_checked(self, saga_id: str, decide: Decide) -> SagaRecord:
        """Read the saga and its journal, append what ``decide`` returns and release the saga
        for any worker to claim, in one transaction (for operator actions, which race with
        each other); return the updated row.

        Raises:
            SagaNotFound: no such saga.
        """
        ...

    async def claim(
        self,
        limit: int,
        caps: Mapping[str, TypeCap] | None = None,
        *,
        suspects: bool = False,
        suspect_after: int = SUSPECT_AFTER,
    ) -> list[Claimed]:
        """Take over up to ``limit`` active sagas that no live worker owns, oldest first;
        sagas of a type in ``caps`` only within its cap. Only sagas that this claim leaves
        taken over from dead workers fewer than ``suspect_after`` times in a row, or
        (``suspects``) only the others."""
        ...

    async def adopt(self, running: Collection[str], limit: int) -> list[Claimed]:
        """Active sagas this worker owns but does not run (``running``): claimed by a call
        whose reply was lost, say."""
        ...

    async def release(self, saga_ids: Sequence[str]) -> None:
        """Give up ownership of these sagas so any worker may claim them."""
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

    async def counts(self) -> dict[str, int]:
        """Number of sagas in each state."""
        ...

    async def schema_version(self) -> int: ...
