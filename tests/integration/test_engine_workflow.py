"""Code-first workflows (``@app.saga``) on a real SQLite file: steps, recorded values,
catching StepFailed, repeated step names, and typed inputs."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sagakit import App, Kind, SagaFailed, SagaState, StepFailed, WorkflowContext


async def test_code_first_workflow_records_values_and_takes_another_path(
    app: App, calls: Any, check: Any
) -> None:
    async def reserve(ctx: Any, data: Any) -> dict[str, Any]:
        calls.add("reserve", step=ctx.step, key=ctx.idempotency_key, data=data)
        return {"hold": ctx.step, "sku": data["sku"]}

    async def release(ctx: Any, data: Any, result: Any) -> None:
        calls.add("release", step=ctx.step, result=result)

    def pay_by_card(ctx: Any, data: Any) -> str:
        calls.add("pay_by_card")
        raise RuntimeError("card declined")

    async def pay_by_invoice(ctx: Any, data: Any) -> str:
        calls.add("pay_by_invoice", data=data)
        return f"invoice-{data['amount']}"

    seen: dict[str, Any] = {}

    @app.saga("Checkout")
    async def checkout(ctx: WorkflowContext, data: dict[str, Any]) -> dict[str, Any]:
        seen["now"], seen["uuid"], seen["random"] = ctx.now(), ctx.uuid(), ctx.random()
        first = await ctx.step(reserve, {"sku": data["sku"]}, compensate=release)
        second = await ctx.step(reserve, {"sku": data["sku"] + "-gift"}, compensate=release)
        try:
            paid = await ctx.step(pay_by_card, data)
        except StepFailed as exc:
            seen["failure"] = (exc.step, exc.attempts, exc.error_type, exc.message)
            paid = await ctx.step(pay_by_invoice, {"amount": data["amount"]})
        return {"holds": [first, second], "paid": paid, "order_ref": str(seen["uuid"])}

    assert checkout.__name__ == "checkout", "the decorator returns the function"
    before = datetime.now(UTC)
    handle = await app.start("Checkout", {"sku": "A", "amount": 30})
    out = await handle.result(timeout=5)

    assert out == {
        "holds": [{"hold": "reserve", "sku": "A"}, {"hold": "reserve#2", "sku": "A-gift"}],
        "paid": "invoice-30",
        "order_ref": str(seen["uuid"]),
    }
    assert calls.names() == ["reserve", "reserve", "pay_by_card", "pay_by_invoice"]
    assert [s["key"] for s in calls.of("reserve")] == [
        f"{handle.id}/reserve",
        f"{handle.id}/reserve#2",
    ]
    assert calls.of("release") == []
    assert seen["failure"] == ("pay_by_card", 1, "RuntimeError", "card declined")
    assert before <= seen["now"] <= datetime.now(UTC)
    assert isinstance(seen["uuid"], uuid.UUID)
    assert 0 <= seen["random"] < 1

    c = await check(app, handle.id)
    assert c.info.state is SagaState.COMPLETED
    values = c.of(Kind.VALUE_RECORDED)
    assert [(e.seq, e.data) for e in values] == [
        (0, {"name": "now", "value": seen["now"].isoformat()}),
        (1, {"name": "uuid", "value": str(seen["uuid"])}),
        (2, {"name": "random", "value": seen["random"]}),
    ]
    assert c.steps(Kind.STEP_COMPLETED, Kind.STEP_FAILED) == [
        (Kind.STEP_COMPLETED, "reserve", 1),
        (Kind.STEP_COMPLETED, "reserve#2", 1),
        (Kind.STEP_FAILED, "pay_by_card", 1),
        (Kind.STEP_COMPLETED, "pay_by_invoice", 1),
    ]
    assert [e.seq for e in c.of(Kind.STEP_COMPLETED, Kind.STEP_FAILED)] == [3, 4, 5, 6]
    assert c.of(Kind.SAGA_COMPENSATING) == []
    # The failed card payment left its error on the row, as the projection says.
    assert c.info.error == {
        "type": "RuntimeError",
        "module": "builtins",
        "message": "card declined",
    }


async def test_uncaught_step_failure_compensates_repeated_steps_by_their_names(
    app: App, calls: Any, check: Any
) -> None:
    async def hold(ctx: Any, seat: str) -> str:
        calls.add("hold", seat=seat, key=ctx.idempotency_key)
        return f"held-{seat}"

    async def unhold(ctx: Any, seat: str, result: str) -> None:
        calls.add("unhold", seat=seat, result=result, key=ctx.idempotency_key, step=ctx.step)

    async def charge(ctx: Any, data: Any) -> None:
        raise RuntimeError("no funds")

    @app.saga("Seats")
    async def seats(ctx: WorkflowContext, data: list[str]) -> None:
        for seat in data:
            await ctx.step(hold, seat, compensate=unhold)
        await ctx.step(charge)

    handle = await app.start("Seats", ["1A", "1B", "1C"])
    with pytest.raises(SagaFailed) as raised:
        await handle.result(timeout=5)
    assert raised.value.state is SagaState.FAILED
    assert raised.value.error is not None
    assert raised.value.error["type"] == "StepFailed"

    assert [(s["step"], s["seat"], s["result"]) for s in calls.of("unhold")] == [
        ("hold#3", "1C", "held-1C"),
        ("hold#2", "1B", "held-1B"),
        ("hold", "1A", "held-1A"),
    ]
    assert [s["key"] for s in calls.of("unhold")] == [
        f"{handle.id}/hold#3/compensate",
        f"{handle.id}/hold#2/compensate",
        f"{handle.id}/hold/compensate",
    ]
    c = await check(app, handle.id)
    assert [e.step for e in c.of(Kind.STEP_COMPLETED)] == ["hold", "hold#2", "hold#3"]
    assert [e.step for e in c.of(Kind.COMPENSATION_COMPLETED)] == ["hold#3", "hold#2", "hold"]


async def test_workflow_raising_by_itself_compensates(app: App, calls: Any, check: Any) -> None:
    async def book(ctx: Any, data: Any) -> int:
        return 7

    async def unbook(ctx: Any, data: Any, result: Any) -> None:
        calls.add("unbook", result=result)

    @app.saga("Validating")
    async def validating(ctx: WorkflowContext, data: Any) -> None:
        booked = await ctx.step(book, data, compensate=unbook)
        if booked > 5:
            raise ValueError(f"booked {booked} rooms, the limit is 5")

    handle = await app.start("Validating")
    with pytest.raises(SagaFailed):
        await handle.result(timeout=5)
    assert calls.of("unbook") == [{"result": 7}]
    c = await check(app, handle.id)
    (comp,) = c.of(Kind.SAGA_COMPENSATING)
    assert comp.error == {
        "type": "ValueError",
        "module": "builtins",
        "message": "booked 7 rooms, the limit is 5",
    }


async def test_output_that_cannot_be_stored_compensates(app: App, calls: Any, check: Any) -> None:
    async def book(ctx: Any, data: Any) -> int:
        return 1

    async def unbook(ctx: Any, data: Any, result: Any) -> None:
        calls.add("unbook")

    @app.saga("BadOutput")
    async def bad_output(ctx: WorkflowContext, data: Any) -> Any:
        await ctx.step(book, data, compensate=unbook)
        return {"socket": object()}

    handle = await app.start("BadOutput")
    with pytest.raises(SagaFailed):
        await handle.result(timeout=5)
    assert calls.names() == ["unbook"]
    c = await check(app, handle.id)
    assert c.info.state is SagaState.FAILED
    (comp,) = c.of(Kind.SAGA_COMPENSATING)
    assert comp.error is not None
    assert comp.error["type"] == "NotSerializable"


@dataclass(frozen=True)
class Transfer:
    source: str
    target: str
    amount: int
    when: datetime


@dataclass(frozen=True)
class Receipt:
    ref: uuid.UUID
    amount: int


async def test_typed_input_and_step_results_are_rebuilt(app: App, check: Any) -> None:
    seen: list[Any] = []

    async def debit(ctx: Any, t: Transfer) -> Receipt:
        seen.append(t)
        return Receipt(ref=uuid.UUID(int=t.amount), amount=t.amount)

    @app.saga("Transfer")
    async def transfer(ctx: WorkflowContext, data: Transfer) -> dict[str, Any]:
        seen.append(data)
        receipt = await ctx.step(debit, data)
        seen.append(receipt)
        return {"ref": receipt.ref, "due": data.when + timedelta(days=1)}

    when = datetime(2024, 5, 1, 12, tzinfo=UTC)
    handle = await app.start("Transfer", Transfer(source="a", target="b", amount=5, when=when))
    out = await handle.result(timeout=5)
    assert out == {"ref": uuid.UUID(int=5), "due": when + timedelta(days=1)}
    assert seen[0] == Transfer(source="a", target="b", amount=5, when=when)
    assert seen[2] == Receipt(ref=uuid.UUID(int=5), amount=5), "results come back typed"
    c = await check(app, handle.id)
    assert c.info.input == {"source": "a", "target": "b", "amount": 5, "when": when}


async def test_many_sagas_run_concurrently(app: App, check: Any) -> None:
    async def work(ctx: Any, n: int) -> int:
        await asyncio.sleep(0.01)
        return n * 2

    @app.saga("Many")
    async def many(ctx: WorkflowContext, n: int) -> int:
        a = await ctx.step(work, n)
        b = await ctx.step(work, a)
        return int(b)

    handles = await asyncio.gather(*(app.start("Many", i) for i in range(100)))
    results = await asyncio.gather(*(h.result(timeout=10) for h in handles))
    assert results == [i * 4 for i in range(100)]
    assert len(await app.list(state="completed", limit=1000)) == 100
    for h in handles[:10]:
        c = await check(app, h.id)
        assert [e.step for e in c.of(Kind.STEP_COMPLETED)] == ["work", "work#2"]
        assert len(c.of(Kind.SAGA_COMPLETED)) == 1
