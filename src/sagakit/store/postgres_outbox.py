"""The outbox on PostgreSQL: relays of many workers claim messages with SKIP LOCKED."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sagakit.store import postgres_sql as sql
from sagakit.store.base import OutboxMessage
from sagakit.store.postgres_errors import translate

if TYPE_CHECKING:
    import asyncpg


async def claim(pool: asyncpg.Pool, location: str, limit: int, lease: float) -> list[OutboxMessage]:
    async with translate(location):
        found = await pool.fetch(sql.OUTBOX_CLAIM, limit, lease)
    messages = [
        OutboxMessage(
            id=r[0],
            saga_id=r[1],
            message_id=r[2],
            topic=r[3],
            message=r[4],
            created_at=r[5],
            attempts=r[6],
        )
        for r in found
    ]
    return sorted(messages, key=lambda m: m.id)


async def done(pool: asyncpg.Pool, location: str, ids: Sequence[int]) -> None:
    async with translate(location):
        await pool.execute(sql.OUTBOX_DONE, list(ids))


async def stats(pool: asyncpg.Pool, location: str) -> tuple[int, float | None]:
    async with translate(location):
        row = await pool.fetchrow(sql.OUTBOX_STATS)
    assert row is not None
    return int(row[0]), None if row[1] is None else float(row[1])
