"""Conversions between stored rows and SagaRecord / Entry, shared by the SQL stores."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from sagakit.journal import Entry, Kind, SagaState
from sagakit.store.base import SagaRecord, Signal

SAGA_COLUMNS: Final = (
    "id, saga_type, version, state, idempotency_key, input, output, error, current_step, "
    "deadline, created_at, updated_at, owner, recoveries, takeovers, parent_id, wake_at"
)
JOURNAL_COLUMNS: Final = "saga_id, idx, kind, at, seq, step, attempt, payload, error, data"
ACTIVE_STATES: Final = ("started", "running", "compensating")


def dumps(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value)


def entry_row(e: Entry) -> tuple[Any, ...]:
    return (
        e.saga_id,
        e.index,
        e.kind.value,
        e.at,
        e.seq,
        e.step,
        e.attempt,
        e.payload,
        dumps(e.error),
        dumps(e.data),
    )


def saga_row(r: SagaRecord) -> tuple[Any, ...]:
    return (
        r.id,
        r.saga_type,
        r.version,
        r.state.value,
        r.idempotency_key,
        r.input,
        r.output,
        dumps(r.error),
        r.current_step,
        r.deadline,
        r.created_at,
        r.updated_at,
        r.owner,
        r.recoveries,
        r.takeovers,
        r.parent_id,
        r.wake_at,
    )


def record(row: Sequence[Any]) -> SagaRecord:
    return SagaRecord(
        id=row[0],
        saga_type=row[1],
        version=row[2],
        state=SagaState(row[3]),
        idempotency_key=row[4],
        input=row[5],
        output=row[6],
        error=None if row[7] is None else json.loads(row[7]),
        current_step=row[8],
        deadline=row[9],
        created_at=row[10],
        updated_at=row[11],
        owner=row[12],
        recoveries=row[13],
        takeovers=row[14],
        parent_id=row[15],
        wake_at=row[16],
    )


def entry(row: Sequence[Any]) -> Entry:
    return Entry(
        saga_id=row[0],
        index=row[1],
        kind=Kind(row[2]),
        at=row[3],
        seq=row[4],
        step=row[5],
        attempt=row[6],
        payload=row[7],
        error=None if row[8] is None else json.loads(row[8]),
        data=None if row[9] is None else json.loads(row[9]),
    )


SIGNAL_COLUMNS: Final = "id, saga_id, signal_id, name, payload, at"


def signal(row: Sequence[Any]) -> Signal:
    return Signal(
        id=row[0], saga_id=row[1], signal_id=row[2], name=row[3], payload=row[4], at=row[5]
    )
