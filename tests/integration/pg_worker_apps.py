"""Saga types for the multi-process PostgreSQL tests (test_pg_workers.py), run by
``python -m sagakit worker --app pg_worker_apps:app`` with this directory on ``PYTHONPATH``.

- ``Trivial``: two async steps that return at once (recovery at scale); in a worker started
  with ``PGW_STALL=seconds`` its steps hang that long instead, so that it holds its sagas.
- ``Slow``: three async steps that each sleep ``data["pause"]`` seconds (bystanders).
- ``Poison``: a step that SIGKILLs the worker process running it, every time.

The worker's App reads its settings from the environment (see :func:`from_environment`).
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from typing import Any

from sagakit import App, Saga, StepContext, step

TRIVIAL, SLOW, POISON = "Trivial", "Slow", "Poison"

ENV = {
    "url": "PGW_URL",
    "lease": "PGW_LEASE",
    "pool_size": "PGW_POOL_SIZE",
    "max_recoveries": "PGW_MAX_RECOVERIES",
    "max_concurrency": "PGW_CONCURRENCY",
    "poll_interval": "PGW_POLL_INTERVAL",
}
STALL = "PGW_STALL"


async def _echo(ctx: StepContext, data: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(float(os.environ.get(STALL, "0")))
    return {"n": data.get("n"), "step": ctx.step}


async def _pause(ctx: StepContext, data: dict[str, Any]) -> str:
    await asyncio.sleep(float(data.get("pause", 0.2)))
    return ctx.step


async def _die(ctx: StepContext, data: dict[str, Any]) -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.sleep(60)  # never reached: SIGKILL is not deferred


def build(url: str, *, worker: bool | None = None, **settings: Any) -> App:
    """An App on ``url`` with the three saga types registered; ``settings`` go to App."""
    app = App(url, worker=worker, **settings)
    app.register(Saga(TRIVIAL, steps=[step("one", _echo), step("two", _echo)]))
    app.register(
        Saga(SLOW, steps=[step("first", _pause), step("second", _pause), step("third", _pause)])
    )
    app.register(Saga(POISON, steps=[step("prepare", _echo), step("explode", _die)]))
    return app


def environment(url: str, **settings: float) -> dict[str, str]:
    """The variables that make :data:`app` ``build(url, **settings)`` in a worker process."""
    return {ENV["url"]: url, **{ENV[k]: str(v) for k, v in settings.items()}}


def from_environment() -> App:
    settings: dict[str, Any] = {}
    for key, var in ENV.items():
        if key != "url" and var in os.environ:
            raw = os.environ[var]
            settings[key] = float(raw) if key in ("lease", "poll_interval") else int(raw)
    return build(os.environ[ENV["url"]], **settings)


@functools.cache
def _env_app() -> App:
    return from_environment()


def __getattr__(name: str) -> App:
    if name == "app":
        return _env_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
