"""The App that the worker subprocesses of test_waits_crash.py run, with
``python -m sagakit worker --app wait_crash_apps:app`` and this directory on ``PYTHONPATH``.

- ``PurchaseApproval``: the approval example (sagakit.examples.approval) with an approval
  window of ``WCA_APPROVAL_SECONDS`` seconds instead of days, so that timeouts come soon.
- ``Hang`` / ``HangLonger``: a compensated ``reserve`` step, then a step that sleeps 30 s
  under a timeout of 1 s / 3 s. Step bodies append a line to the file ``WCA_RUNS``, so the
  test sees which ran, and how often, across worker processes.

Settings come from the environment (see :func:`environment`); the test's own client App is
made with :func:`build` and the same values.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from pathlib import Path
from typing import Any

from sagakit import App, Saga, StepContext, step
from sagakit.examples.approval import create_app

HANG, HANG_LONGER = "Hang", "HangLonger"
TIMEOUTS = {HANG: 1.0, HANG_LONGER: 3.0}

ENV = {
    "url": "WCA_URL",
    "budget": "WCA_BUDGET",
    "runs": "WCA_RUNS",
    "approval_seconds": "WCA_APPROVAL_SECONDS",
    "poll_interval": "WCA_POLL_INTERVAL",
    "lease": "WCA_LEASE",
}


class Runs:
    """An append-only file of what step bodies did, shared by every worker process."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def add(self, line: str) -> None:
        with self.path.open("a") as f:
            f.write(f"{line}\n")
            f.flush()
            os.fsync(f.fileno())

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []


def build(
    url: str,
    *,
    budget: str | os.PathLike[str],
    runs: str | os.PathLike[str],
    approval_seconds: float,
    worker: bool | None = None,
    **settings: Any,
) -> App:
    app = create_app(url, budget_path=budget, approval_days=approval_seconds / 86400,
                     worker=worker, **settings)  # fmt: skip
    log = Runs(runs)

    async def reserve(ctx: StepContext, data: Any) -> str:
        log.add(f"reserve {ctx.saga_id}")
        return ctx.idempotency_key

    async def release(ctx: StepContext, data: Any, result: Any) -> None:
        log.add(f"release {ctx.saga_id}")

    async def hang(ctx: StepContext, data: Any) -> None:
        log.add(f"hang {ctx.saga_id} {time.time():.6f}")
        await asyncio.sleep(30)

    for name, timeout in TIMEOUTS.items():
        app.register(
            Saga(
                name,
                steps=[
                    step("reserve", reserve, compensate=release),
                    step("hang", hang, timeout=timeout),
                ],
            )
        )
    return app


def environment(url: str, **settings: Any) -> dict[str, str]:
    """The variables that make :data:`app` ``build(url, **settings)`` in a worker process."""
    return {ENV["url"]: url, **{ENV[k]: str(v) for k, v in settings.items()}}


def from_environment() -> App:
    settings: dict[str, Any] = {}
    for key, var in ENV.items():
        if key != "url" and var in os.environ:
            raw = os.environ[var]
            numeric = key in ("approval_seconds", "poll_interval", "lease")
            settings[key] = float(raw) if numeric else raw
    return build(os.environ[ENV["url"]], **settings)


@functools.cache
def _env_app() -> App:
    return from_environment()


def __getattr__(name: str) -> App:
    if name == "app":
        return _env_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
