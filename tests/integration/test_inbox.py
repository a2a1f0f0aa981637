"""The Inbox on its own, the same assertions on SQLite and on PostgreSQL: what a transaction
commits, what a savepoint undoes, and what a concurrent duplicate sees."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from service_helpers import Effects

from sagakit.inbox import Inbox


async def write(db: Any, key: str) -> None:
    await Effects.write(db, key, "A")


async def test_transaction_commits_the_row_and_the_effect(any_url: str) -> None:
    effects = Effects(any_url)
    async with Inbox(any_url) as inbox:
        await effects.create()
        assert await inbox.seen("m1") is None
        async with inbox.transaction() as tx:
            assert await tx.claim("m1")
            await write(tx.db, "k1")
            await tx.record("m1", '{"reply":1}')
        async with inbox.transaction() as tx:
            assert await tx.claim("m2")
            await tx.record("m2", "")
        assert await inbox.seen("m1") == '{"reply":1}'
        assert await inbox.seen("m2") == ""
        async with inbox.transaction() as tx:
            assert not await tx.claim("m1")  # a duplicate
    assert await effects.rows() == [("k1", "A")]


async def test_a_failed_block_rolls_back_everything(any_url: str) -> None:
    effects = Effects(any_url)
    async with Inbox(any_url) as inbox:
        await effects.create()

        async def dies() -> None:
            async with inbox.transaction() as tx:
                await tx.claim("m1")
                await write(tx.db, "k1")
                raise RuntimeError("the process dies here")

        with pytest.raises(RuntimeError):
            await dies()
        assert await inbox.seen("m1") is None
    assert await effects.rows() == []


async def test_a_savepoint_undoes_the_handler_only(any_url: str) -> None:
    effects = Effects(any_url)
    async with Inbox(any_url) as inbox:
        await effects.create()
        async with inbox.transaction() as tx:
            await tx.claim("m1")

            async def handler() -> None:
                async with tx.savepoint():
                    await write(tx.db, "k1")
                    raise ValueError("out of stock")

            with pytest.raises(ValueError, match="out of stock"):
                await handler()
            await tx.record("m1", "failed")
        assert await inbox.seen("m1") == "failed"
    assert await effects.rows() == []


async def test_a_savepoint_recovers_from_an_aborted_transaction(pg_url: str) -> None:
    """A handler that caught its own SQL error and went on leaves a PostgreSQL transaction
    aborted: leaving the savepoint fails, and it is rolled back like a handler that raised."""
    import asyncpg

    effects = Effects(pg_url)
    async with Inbox(pg_url) as inbox:
        await effects.create()
        async with inbox.transaction() as tx:
            await tx.claim("m1")

            async def careless() -> None:
                async with tx.savepoint():
                    await write(tx.db, "k1")
                    with contextlib.suppress(asyncpg.UniqueViolationError):
                        await write(tx.db, "k1")

            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await careless()
            await tx.record("m1", "failed")
        assert await inbox.seen("m1") == "failed"
    assert await effects.rows() == []


async def test_a_concurrent_duplicate_waits_and_is_told_seen(any_url: str) -> None:
    async with Inbox(any_url) as first, Inbox(any_url) as second:
        inside = asyncio.Event()
        finish = asyncio.Event()

        async def handle() -> None:
            async with first.transaction() as tx:
                assert await tx.claim("m1")
                inside.set()
                await finish.wait()
                await tx.record("m1", "reply")

        task = asyncio.create_task(handle())
        await inside.wait()

        async def duplicate() -> bool:
            async with second.transaction() as tx:
                return await tx.claim("m1")

        dup = asyncio.create_task(duplicate())
        await asyncio.sleep(0.2)
        assert not dup.done()  # it waits for the first transaction
        finish.set()
        await task
        assert await dup is False
        assert await second.seen("m1") == "reply"
