"""Durable waits inside a workflow: timers, signals and parallel branches.

A wait is journaled when it starts (TIMER_STARTED, SIGNAL_WAITING) and when it ends
(TIMER_FIRED, SIGNAL_RECEIVED, SIGNAL_TIMED_OUT). In between, the run unloads the saga by
raising :class:`~sagakit.engine.Suspend`; the store wakes it when the timer is due or a signal
arrives, and the replay picks the wait up where it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from sagakit.codec import decode
from sagakit.engine import GROUP, ReplayExhausted, Suspend
from sagakit.errors import NonDeterminismError, SignalTimedOut
from sagakit.journal import Kind
from sagakit.store.base import CANCEL_SIGNAL, WAIT_FOREVER, Signal
from sagakit.workflow import WorkflowContext

if TYPE_CHECKING:
    from sagakit.engine import SagaRun


async def sleep(run: SagaRun, *, until: float | None = None, delay: float = 0.0) -> None:
    """Wait until ``until`` (epoch seconds), or ``delay`` seconds from now, durably."""
    run.check_broken()
    seq, _ = run.next("ctx.sleep")
    if (problem := run.mismatch(seq, "ctx.sleep()")) is not None:
        raise problem
    if seq in run.recorded:
        return
    if run.replay_only:
        raise ReplayExhausted
    await run.cancel_point()
    run.check_deadline("ctx.sleep()")
    wait = run.waits.get(seq)
    if wait is None:
        due = until if until is not None else run.latest_now() + delay
        run.write_soon(Kind.TIMER_STARTED, seq=seq, data=_grouped({"until": due}))
    else:
        due = float((wait.data or {})["until"])
    if run.earliest_now() >= due:
        run.write_soon(Kind.TIMER_FIRED, seq=seq, data={"until": due})
        return
    raise Suspend(due)


async def wait_for_signal(
    run: SagaRun, names: tuple[str, ...], timeout: float | None, hint: Any
) -> tuple[str, Any]:
    """The name and payload of the earliest signal named one of ``names`` not yet delivered
    to this saga, waiting for one durably; :class:`SignalTimedOut` once ``timeout`` seconds
    passed without one."""
    run.check_broken()
    wanted = "|".join(names)
    seq, _ = run.next(f"ctx.signal.{wanted}")
    if (problem := run.mismatch(seq, signal_identity(wanted))) is not None:
        raise problem
    rec = run.recorded.get(seq)
    if rec is not None:
        data = rec.data or {}
        if rec.kind is Kind.SIGNAL_RECEIVED:
            return str(data.get("name")), decode(rec.payload, hint)
        raise SignalTimedOut(run.saga_id, wanted, data.get("timeout"))
    if run.replay_only:
        raise ReplayExhausted
    await run.cancel_point()
    run.check_deadline(signal_identity(wanted))
    wait = run.waits.get(seq)
    if wait is None:
        until = None if timeout is None else run.latest_now() + timeout
        data = _grouped({"name": wanted, "until": until, "timeout": timeout})
        run.write_soon(Kind.SIGNAL_WAITING, seq=seq, data=data)
    else:
        until = (wait.data or {}).get("until")
    signals = await run.store.signals(run.saga_id)
    await _take_cancel_signal(run, signals)
    for s in signals:
        # A signal that arrived after the wait timed out is too late, even if no worker was
        # up to see the timeout first: the outcome must not depend on that.
        late = until is not None and s.at > until
        if s.name in names and s.signal_id not in run.signal_ids and not late:
            run.signal_ids.add(s.signal_id)
            run.write_soon(Kind.SIGNAL_RECEIVED, seq=seq, payload=s.payload,
                           data={"name": s.name, "signal_id": s.signal_id,
                                 "waited": wanted})  # fmt: skip
            return s.name, decode(s.payload, hint)
    if until is not None and run.earliest_now() >= until:
        run.write_soon(Kind.SIGNAL_TIMED_OUT, seq=seq, data={"name": wanted, "timeout": timeout})
        raise SignalTimedOut(run.saga_id, wanted, timeout)
    consumed = {
        n: sum(1 for s in signals if s.name == n and s.signal_id in run.signal_ids) for n in names
    }
    raise Suspend(WAIT_FOREVER if until is None else until, signals=consumed)


def _grouped(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the parallel group the wait runs in, if any (for graphs and timelines)."""
    group = GROUP.get()
    return data if group is None else {**data, "group": group}


def signal_identity(wanted: str) -> str:
    return f"ctx.wait_for_signal({wanted!r})"


async def _take_cancel_signal(run: SagaRun, signals: list[Signal]) -> None:
    for s in signals:
        if s.name == CANCEL_SIGNAL and not run.cancel_known:
            reason = (decode(s.payload) or {}).get("reason", "")
            run.request_cancel(str(reason))
            await run.cancel_point()


# The WorkflowContext methods whose calls ctx.parallel() accepts as branches.
BRANCHES = frozenset(
    {
        WorkflowContext.step.__code__,
        WorkflowContext.child.__code__,
        WorkflowContext.sleep.__code__,
        WorkflowContext.wait_for_signal.__code__,
        WorkflowContext.wait_for_any_signal.__code__,
        WorkflowContext.call.__code__,
    }
)


async def parallel(run: SagaRun, branches: Sequence[Awaitable[Any]]) -> list[Any]:
    """Run ``branches`` (each one ``ctx.step(...)``, ``ctx.child(...)``, ``ctx.sleep(...)``
    or ``ctx.wait_for_signal(...)``) at once and return their results in order. Each gets its
    place in the journal in argument order, so a replay matches them up again."""
    for b in branches:
        if getattr(b, "cr_code", None) not in BRANCHES:
            for other in branches:
                close = getattr(other, "close", None)
                if close is not None:
                    close()  # never awaited: close it so Python does not warn
            raise TypeError(
                "ctx.parallel() takes calls like ctx.step(...) or ctx.child(...), one per "
                f"branch, got {b!r}; for several steps in a branch, make the branch a child saga"
            )
    run.check_broken()
    token = GROUP.set(run.seq_counter)
    try:
        tasks = [asyncio.ensure_future(b) for b in branches]
    finally:
        GROUP.reset(token)
    try:
        await asyncio.wait(tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return _settle(run, tasks)


def _settle(run: SagaRun, tasks: list[asyncio.Task[Any]]) -> list[Any]:
    """The group's results, or what it raises: a non-determinism or the end of a replay
    first; then a wait for something that may still act (a child saga), so that it is
    known before anything is compensated; then a branch's failure; then any other wait."""
    run.check_broken()
    errors = [t.exception() for t in tasks]
    for kind in (NonDeterminismError, ReplayExhausted):
        for exc in errors:
            if isinstance(exc, kind):
                raise exc
    waits = [e for e in errors if isinstance(e, Suspend)]
    merged = None
    for w in waits:
        merged = w if merged is None else merged.merge(w)
    if merged is not None and merged.effects:
        raise merged
    for exc in errors:
        if exc is not None and not isinstance(exc, Suspend):
            raise exc
    if merged is not None:
        raise merged
    return [t.result() for t in tasks]
