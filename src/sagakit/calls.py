"""Calling a step's action or compensation: thread pool or event loop, middleware, timeout."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from sagakit.clock import Clock, SystemClock
from sagakit.errors import StepTimedOut
from sagakit.middleware import Middleware, StepCall, chain
from sagakit.workflow import StepContext


@functools.cache
def is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )


@functools.cache
def return_hint(fn: Callable[..., Any]) -> Any:
    try:
        return typing.get_type_hints(fn).get("return")
    except Exception:  # unresolvable annotations: decode to plain JSON values
        return None


async def call(
    fn: Callable[..., Any],
    ctx: StepContext,
    args: tuple[Any, ...],
    *,
    executor: Executor | None,
    clock: Clock,
    middleware: Sequence[Middleware],
    info: StepCall | None,
    remaining: float | None,
    timeout: float,
    of: int,
) -> Any:
    """Run ``fn(ctx, *args)`` through ``middleware``, failing with StepTimedOut after
    ``remaining`` seconds (of the attempt's ``timeout``; None for no limit)."""

    async def body() -> Any:
        if is_async(fn):
            return await fn(ctx, *args)
        loop = asyncio.get_running_loop()
        # The thread sees this task's context variables (log fields, the current span).
        context = contextvars.copy_context()
        return await loop.run_in_executor(executor, context.run, functools.partial(fn, ctx, *args))

    proceed = chain(middleware, info, body) if middleware and info is not None else body
    if remaining is None:
        return await proceed()
    timed_out = StepTimedOut(ctx.saga_id, ctx.step, after=timeout, attempt=ctx.attempt, of=of)
    if remaining <= 0:
        raise timed_out
    if isinstance(clock, SystemClock):
        try:
            async with asyncio.timeout(remaining) as scope:
                return await proceed()
        except TimeoutError as exc:
            if not scope.expired():
                raise  # the step's own TimeoutError, not ours
            raise timed_out from exc
    return await _race(proceed(), clock.sleep(remaining), timed_out)


async def _race(work: typing.Awaitable[Any], alarm: typing.Awaitable[None], err: Exception) -> Any:
    """``work`` unless ``alarm`` (a sleep on a non-system clock) ends first: then ``err``."""
    task = asyncio.ensure_future(work)
    timer = asyncio.ensure_future(alarm)
    try:
        await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        timer.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise err
