"""Helpers of the Service tests: brokers by name, commands as the orchestrator sends them, a
reply collector, and the handlers' own table next to the inbox."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from broker_env import URLS, Brokers, broker_lock, cleanup, require_broker

from sagakit.messaging import Broker, Envelope
from sagakit.remote import command_id


@contextlib.asynccontextmanager
async def connected(kind: str) -> AsyncIterator[Broker]:
    """A connected broker of ``kind`` in a namespace (prefix) of its own, cleaned up after.

    A real broker that is not running skips the test (fails it under CI=true); the shared
    lock keeps the broker restart tests of another pytest process from stopping it meanwhile.
    """
    require_broker(kind)
    brokers = Brokers(kind, f"t{uuid.uuid4().hex[:10]}")
    async with broker_lock(exclusive=False):
        try:
            yield await brokers.open()
        finally:
            for broker in brokers.made:
                await broker.close()
            if kind != "memory":
                with contextlib.suppress(Exception):  # best effort, like the broker tests
                    await cleanup(URLS[kind], brokers.prefix, brokers.queues())


def command(
    service: str,
    name: str,
    data: Any,
    *,
    saga_id: str | None = None,
    step: str = "reserve",
    attempt: int = 1,
    compensation: bool = False,
    reply_to: str | None = "sagakit.replies",
) -> Envelope:
    """A command envelope exactly as the orchestrator sends it."""
    saga_id = saga_id or str(uuid.uuid4())
    key = f"{saga_id}/{step}" + ("/compensate" if compensation else "")
    return Envelope.new(
        f"{service}.{name}",
        data,
        correlation_id=saga_id,
        message_id=command_id(saga_id, step, attempt, compensation=compensation),
        reply_to=reply_to,
        headers={
            "idempotency_key": key,
            "attempt": str(attempt),
            "step": step,
            "saga_type": "order",
            "compensation": "1" if compensation else "0",
        },
    )


class Replies:
    """Collects what arrives on a reply topic, acking each."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.broker, self.topic = broker, topic
        self.got: list[Envelope] = []
        self._task: asyncio.Task[None] | None = None
        self._subscription: Any = None

    async def __aenter__(self) -> Replies:
        await self.broker.declare(self.topic, "test-replies")
        self._subscription = self.broker.subscribe(self.topic, "test-replies")
        self._task = asyncio.create_task(self._consume())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._subscription.aclose()

    async def _consume(self) -> None:
        async for delivery in self._subscription:
            self.got.append(delivery.envelope)
            await delivery.ack()

    def to(self, cmd: Envelope) -> list[Envelope]:
        return [r for r in self.got if r.causation_id == cmd.message_id]

    async def wait(self, cmd: Envelope, count: int = 1, timeout: float = 20.0) -> list[Envelope]:
        """The replies to ``cmd`` once there are ``count``; then checks no more come soon."""
        deadline = time.monotonic() + timeout
        while len(self.to(cmd)) < count:
            assert time.monotonic() < deadline, f"{len(self.to(cmd))} replies, wanted {count}"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        return self.to(cmd)


class Effects:
    """The handlers' own table ``stock_reservations`` in the inbox's database, on either
    backend: the handler writes it through ``ctx.db``, the test reads it back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pg = url.startswith("postgresql")

    async def create(self) -> None:
        ddl = "CREATE TABLE stock_reservations (key text PRIMARY KEY, sku text NOT NULL)"
        await self._run(ddl)

    @staticmethod
    async def write(db: Any, key: str, sku: str) -> None:
        """The handler side: an INSERT in the inbox transaction."""
        if isinstance(db, sqlite3.Connection):
            db.execute("INSERT INTO stock_reservations (key, sku) VALUES (?, ?)", (key, sku))
        else:
            await db.execute("INSERT INTO stock_reservations (key, sku) VALUES ($1, $2)", key, sku)

    async def rows(self) -> list[tuple[str, str]]:
        return sorted(await self._run("SELECT key, sku FROM stock_reservations"))

    async def inbox(self) -> dict[str, str]:
        return dict(await self._run("SELECT message_id, reply FROM sagakit_inbox"))

    async def tables(self) -> set[str]:
        if self.pg:
            found = await self._run(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            )
        else:
            found = await self._run("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {r[0] for r in found}

    async def _run(self, query: str) -> list[tuple[Any, ...]]:
        if not self.pg:
            conn = sqlite3.connect(self.url[len("sqlite:///") :])
            try:
                with conn:
                    return [tuple(r) for r in conn.execute(query).fetchall()]
            finally:
                conn.close()
        import asyncpg

        parts = urlsplit(self.url)
        schema = parts.query.split("schema=", 1)[1]
        dsn = parts._replace(query="").geturl()
        pg = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            return [tuple(r) for r in await pg.fetch(query)]
        finally:
            await pg.close()
