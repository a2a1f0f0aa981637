"""The deploy-safety check replays unfinished sagas against new code and writes nothing."""

from __future__ import annotations

import asyncio
from typing import Any

from sagakit import App, StepContext
from sagakit.check import check
from sagakit.journal import SagaState


async def reserve(ctx: StepContext, data: Any) -> str:
    return "r"


async def charge(ctx: StepContext, data: Any) -> str:
    await asyncio.sleep(3600)  # still running when the App closes
    return "c"


async def ship(ctx: StepContext, data: Any) -> str:
    return "s"


def original(app: App) -> None:
    @app.saga("Order")
    async def order(ctx: Any, data: Any) -> list[str]:
        return [await ctx.step(reserve, data), await ctx.step(charge, data)]


def reordered(app: App) -> None:
    @app.saga("Order")
    async def order(ctx: Any, data: Any) -> list[str]:
        return [await ctx.step(ship, data), await ctx.step(charge, data)]


async def _start_and_stop_mid_step(url: str) -> str:
    app = App(url, poll_interval=0.05)
    original(app)
    handle = await app.start("Order", {"n": 1})
    for _ in range(200):
        if any(e.step == "charge" for e in await app.journal(handle.id)):
            break
        await asyncio.sleep(0.01)
    await app.close()
    return handle.id


async def test_check_passes_unchanged_code_and_flags_a_changed_workflow(any_url: str) -> None:
    saga_id = await _start_and_stop_mid_step(any_url)

    same = App(any_url, worker=False)
    original(same)
    try:
        assert await check(same) == (1, [])
    finally:
        await same.close()

    changed = App(any_url, worker=False)
    reordered(changed)
    try:
        before = await changed.journal(saga_id)
        checked, broken = await check(changed)
        assert checked == 1
        assert [(b.saga_id, b.state) for b in broken] == [(saga_id, SagaState.RUNNING)]
        assert "'ship'" in broken[0].reason
        assert "'reserve'" in broken[0].reason
        assert await changed.journal(saga_id) == before  # nothing was written
    finally:
        await changed.close()

    gone = App(any_url, worker=False)
    try:
        (_, [breakage]) = await check(gone)
        assert "not registered" in breakage.reason
    finally:
        await gone.close()
