"""The Store protocol: the only thing the engine knows about databases."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sagakit.journal import SUSPECT_AFTER, Entry, Kind, SagaState

if TYPE_CHECKING:
    from sagakit.definition import Saga


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
    parent_id: str | None = None  # the saga that started this one as a child
    wake_at: float | None = None  # set while suspended: claimable from then on


@dataclass(frozen=True, slots=True, kw_only=True)
class Signal:
    """A signal stored for a saga. ``id`` orders signals by arrival (store-wide);
    ``signal_id`` is the sender's id, unique per saga (a repeat is stored once)."""

    id: int
    saga_id: str
    signal_id: str
    name: str
    payload: str | None
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxMessage:
    """A command waiting in the outbox: ``message`` is its envelope's JSON, ``attempts``
    counts the relays that claimed it."""

    id: int
    saga_id: str
    message_id: str
    topic: str
    message: str
    created_at: float
    attempts: int


CANCEL_SIGNAL = "sagakit.cancel"  # the signal app.cancel() sends; ``sagakit.`` names are reserved
WAIT_FOREVER = 253402300799.0  # 9999-12-31: the wake_at of a wait without timeout


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


def new_saga(
    saga: Saga,
    payload: str,
    *,
    now: float,
    saga_id: str | None = None,
    idempotency_key: str | None = None,
    deadline: float | None = None,
    owner: str | None = None,
    parent_id: str | None = None,
) -> tuple[SagaRecord, Entry]:
    """The row and first journal entry of a new saga of definition ``saga`` with the encoded
    input ``payload``; ``deadline`` in seconds from ``now`` (default: the definition's)."""
    limit = deadline if deadline is not None else saga.deadline
    record = SagaRecord(
        id=saga_id or str(uuid.uuid4()),
        saga_type=saga.name,
        version=saga.version,
        state=SagaState.STARTED,
        idempotency_key=idempotency_key,
        input=payload,
        output=None,
        error=None,
        current_step=None,
        deadline=None if limit is None else now + limit,
        created_at=now,
        updated_at=now,
        owner=owner,
        parent_id=parent_id,
    )
    first = Entry(saga_id=record.id, index=0, kind=Kind.SAGA_STARTED, at=now, payload=payload,
                  data={"version": saga.version})  # fmt: skip
    return record, first


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

    async def by_idempotency_key(self, key: str) -> SagaRecord | None:
        """The saga started with idempotency key ``key``, or None. A key is unique across
        the whole store, whatever the saga's type, so this is one indexed lookup."""
        ...

    async def journal(self, saga_id: str) -> list[Entry]: ...

    async def list_sagas(
        self,
        *,
        state: SagaState | None = None,
        saga_type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[SagaRecord]: ...

    async def counts(self, saga_type: str | None = None) -> dict[str, int]:
        """Number of sagas in each state (of ``saga_type`` only, if given)."""
        ...

    # -- timers, signals, children (suspended sagas) ------------------------------------------

    def clock_bounds(self) -> tuple[float, float]:
        """Lower and upper bounds of the clock that judges timers now (the database's clock on
        PostgreSQL): a timer set for ``upper + delay`` and fired once ``lower >= until`` never
        fires early."""
        ...

    async def suspend(
        self,
        saga_id: str,
        wake_at: float,
        signals: Mapping[str, int],
        children: Sequence[str],
    ) -> None:
        """Unload a saga this worker owns until ``wake_at`` (by the store's clock): release it
        and make it claimable from then on; at once instead if, by the time this commits, a
        saga in ``children`` is completed, failed or cancelled, or more
        signals named ``name`` were stored for it than the ``signals[name]`` it consumed.
        Fenced like ``append``; entries queued before commit first."""
        ...

    async def wake(self, saga_id: str) -> None:
        """Make a suspended saga claimable now (a child of it ended); no-op otherwise."""
        ...

    async def next_wake(self) -> float | None:
        """The earliest ``wake_at`` of a suspended saga, or None."""
        ...

    async def send_signal(
        self, saga_id: str, signal_id: str, name: str, payload: str | None, at: float
    ) -> bool:
        """Store a signal and wake the saga, in one transaction; False (and nothing written)
        if the saga already has a signal with ``signal_id``. The signal's arrival time is
        ``at`` by the clock that judges timers (the database's, on PostgreSQL).

        Raises:
            SagaNotFound: no such saga.
            InvalidSagaState: the saga is completed, failed or cancelled.
        """
        ...

    async def signals(self, saga_id: str, name: str | None = None) -> list[Signal]:
        """The saga's signals (named ``name`` only, if given) in order of arrival."""
        ...

    # -- the outbox ------------------------------------------------------------------------------

    async def outbox_claim(self, limit: int, lease: float) -> list[OutboxMessage]:
        """Up to ``limit`` outbox messages no relay holds, oldest first, held for ``lease``
        seconds (a relay that dies lets them go after that)."""
        ...

    async def outbox_done(self, ids: Sequence[int]) -> None:
        """Delete relayed messages."""
        ...

    async def outbox_stats(self) -> tuple[int, float | None]:
        """How many messages wait in the outbox, and when the oldest was written."""
        ...

    async def cancel_requests(self, after: int) -> list[Signal]:
        """Cancel signals (``CANCEL_SIGNAL``) with ``id > after`` to sagas that are started,
        running or compensating, in order of ``id``."""
        ...

    async def schema_version(self) -> int: ...
