"""``sagakit bench``: how many sagas per second sagakit sustains on a database of this machine.

The saga is a 4-step order (reserve, charge, ship, confirm), each step with a compensation;
every 10th order is declined at payment and compensated. The step bodies do nothing, so the
figures are sagakit's own cost: journal writes, durable commits, scheduling and encoding. The
floor is the same steps as plain function calls, with nothing durable.

The repository's ``benchmarks/`` scripts (``make bench``) use the same saga and driver and add
comparisons (several worker processes, DBOS, remote steps over brokers).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sagakit.app import App
from sagakit.definition import Saga, step
from sagakit.errors import ConfigurationError, SagaFailed
from sagakit.workflow import StepContext

STEPS = 4
WARM_UP = 50  # sagas run before each measurement, not counted


class Declined(Exception):
    """The bench's payment step declines every 10th order."""


async def reserve(ctx: StepContext | None, order: dict[str, Any]) -> dict[str, Any]:
    return {"reservation": order["id"]}


async def release(ctx: StepContext | None, order: dict[str, Any], result: Any) -> None:
    return None


async def charge(ctx: StepContext | None, order: dict[str, Any]) -> dict[str, Any]:
    if order["id"] % 10 == 0:
        raise Declined("card declined")
    return {"payment": order["id"]}


async def refund(ctx: StepContext | None, order: dict[str, Any], result: Any) -> None:
    return None


async def ship(ctx: StepContext | None, order: dict[str, Any]) -> dict[str, Any]:
    return {"shipment": order["id"]}


async def cancel_shipment(ctx: StepContext | None, order: dict[str, Any], result: Any) -> None:
    return None


async def confirm(ctx: StepContext | None, order: dict[str, Any]) -> str:
    return "sent"


async def cancel_notice(ctx: StepContext | None, order: dict[str, Any], result: Any) -> None:
    return None


_STEPS: list[tuple[str, Callable[..., Awaitable[Any]], Callable[..., Awaitable[None]]]] = [
    ("reserve_inventory", reserve, release),
    ("process_payment", charge, refund),
    ("create_shipment", ship, cancel_shipment),
    ("send_confirmation", confirm, cancel_notice),
]
ORDER_SAGA = Saga(
    "OrderFulfillment", steps=[step(name, do, compensate=undo) for name, do, undo in _STEPS]
)


async def plain_saga(order: dict[str, Any]) -> bool:
    """The floor: the same steps as plain calls, compensations on failure, nothing durable."""
    done: list[tuple[Callable[..., Awaitable[None]], Any]] = []
    try:
        for _, do, undo in _STEPS:
            done.append((undo, await do(None, order)))
    except Declined:
        for undo, result in reversed(done):
            await undo(None, order, result)
        return False
    return True


@dataclass(frozen=True, slots=True)
class Run:
    """One driven batch: its wall time and each saga's latency, in seconds."""

    seconds: float
    latencies: list[float]
    completed: int

    @property
    def rate(self) -> float:
        """Sagas per second."""
        return len(self.latencies) / self.seconds


async def drive(
    n: int,
    in_flight: int,
    one: Callable[[dict[str, Any]], Awaitable[bool]],
    *,
    progress: Callable[[], None] | None = None,
) -> Run:
    """Run orders 1..``n`` through ``one`` with at most ``in_flight`` at once (``one``
    returns whether the order completed); ``progress`` is called after each."""
    orders = iter(range(1, n + 1))
    latencies: list[float] = []
    completed = 0

    async def lane() -> None:
        nonlocal completed
        for i in orders:
            began = time.perf_counter()
            ok = await one({"id": i, "sku": "BOOK-1", "amount": "19.99"})
            latencies.append(time.perf_counter() - began)
            completed += ok
            if progress is not None:
                progress()

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return Run(time.perf_counter() - start, latencies, completed)


@dataclass(frozen=True, slots=True)
class BenchResult:
    """One figure of ``sagakit bench``: ``sagas`` order sagas with ``in_flight`` at once."""

    in_flight: int
    sagas: int
    completed: int
    compensated: int
    seconds: float
    sagas_per_second: float
    floor_sagas_per_second: float
    p50_ms: float
    p95_ms: float
    us_per_step: float

    @classmethod
    def of(cls, in_flight: int, run: Run, floor: Run) -> BenchResult:
        quantiles = statistics.quantiles(run.latencies, n=20, method="inclusive")
        # The latency durability adds to one step: wall time per saga minus the floor's,
        # over the steps, times the sagas in flight.
        per_step = (1 / run.rate - 1 / floor.rate) / STEPS * 1e6 * in_flight
        return cls(
            in_flight=in_flight,
            sagas=len(run.latencies),
            completed=run.completed,
            compensated=len(run.latencies) - run.completed,
            seconds=run.seconds,
            sagas_per_second=run.rate,
            floor_sagas_per_second=floor.rate,
            p50_ms=statistics.median(run.latencies) * 1000,
            p95_ms=quantiles[18] * 1000,
            us_per_step=per_step,
        )


async def bench(
    url: str,
    sagas: int,
    in_flight: int,
    *,
    durability: str = "full",
    progress: Callable[[], None] | None = None,
) -> BenchResult:
    """Run ``sagas`` order sagas on the database ``url`` (it must be a scratch one: every
    saga stays in it) with ``in_flight`` at once, after a warm-up, and the floor beside."""
    floor = await drive(sagas, in_flight, plain_saga)
    app = App(url, durability=durability)
    app.register(ORDER_SAGA)
    await app.open()

    async def one(order: dict[str, Any]) -> bool:
        handle = await app.start(ORDER_SAGA.name, order)
        try:
            await handle.result()
        except SagaFailed:
            return False
        return True

    try:
        await drive(min(sagas, WARM_UP), in_flight, one)
        run = await drive(sagas, in_flight, one, progress=progress)
    finally:
        await app.close()
    return BenchResult.of(in_flight, run, floor)


@contextlib.asynccontextmanager
async def scratch_schema(url: str) -> AsyncIterator[str]:
    """A PostgreSQL ``url`` with a new schema of its own (``?schema=sagakit_bench_…``),
    dropped with everything in it on exit."""
    if "schema" in parse_qs(urlsplit(url).query):
        raise ConfigurationError(
            "the bench makes its own scratch schema and drops it afterwards; "
            "leave ?schema= out of the URL"
        )
    import asyncpg  # the postgres extra; App(url) below says so if it is missing

    schema = f"sagakit_bench_{uuid.uuid4().hex[:10]}"
    try:
        yield f"{url}{'&' if '?' in url else '?'}schema={schema}"
    finally:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()
