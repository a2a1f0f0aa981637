"""Waiting in tests for a saga to reach a waiting point (a timer, a signal, a child)."""

from __future__ import annotations

import asyncio

from sagakit.app import App
from sagakit.handle import SagaInfo
from sagakit.journal import TERMINAL, SagaState


async def until_waiting(app: App, saga_id: str, *, timeout: float = 10.0) -> SagaInfo:
    """Return once the saga is unloaded, waiting for a timer, a signal or a child saga (or
    has stopped: completed, failed, cancelled, needs attention), polling its row; so that a
    test moves a virtual clock only once the saga's timer is set.

    Raises:
        TimeoutError: ``timeout`` seconds of real time passed first.
    """
    resting = {*TERMINAL, SagaState.NEEDS_ATTENTION}
    async with asyncio.timeout(timeout):
        while True:
            info = await app.get(saga_id)
            if info.waiting or info.state in resting:
                return info
            await asyncio.sleep(0.01)
