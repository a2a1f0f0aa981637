"""Compensation: undoing a saga's completed steps in reverse order of completion.

The steps of one parallel group are compensated together (concurrently), the earlier steps
after them; each compensation is recorded before it runs and when it finishes, and retried
per its policy. One that keeps failing stops the saga in ``needs_attention`` with the list of
compensations still owed. A completed child saga is compensated along its own path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sagakit import remote_steps
from sagakit.children import compensate_child
from sagakit.codec import error_info
from sagakit.engine import Done, Suspend
from sagakit.errors import NonDeterminismError
from sagakit.journal import Kind, SagaState
from sagakit.middleware import StepCall
from sagakit.remote import Remote

if TYPE_CHECKING:
    from sagakit.engine import SagaRun

log = logging.getLogger("sagakit.engine")


async def compensate(run: SagaRun, exc: Exception | None) -> SagaState:
    """Compensate the completed steps owed a compensation, in reverse order of completion
    (a parallel group's together), then end the saga failed or cancelled; or stop in
    needs_attention if a compensation exhausts its retries."""
    if not run.compensating:
        err = error_info(exc) if exc is not None else None
        log.info("saga %s compensating: %s", run.saga_id, exc)
        await run.write(Kind.SAGA_COMPENSATING, error=err)
        run.compensating = True
    for batch in _batches(run):
        missing = [name for seq, name in batch if seq not in run.done_steps]
        if missing:
            why = "no step (the replay ended before it)"
            seq = next(seq for seq, _ in batch if seq not in run.done_steps)
            problem = NonDeterminismError(run.saga_id, seq, f"step {missing[0]!r}", why)
            return await run.park(problem)
        todo = [run.done_steps[seq] for seq, _ in batch]
        failures = await _compensate_batch(run, todo)
        if failures:
            done, failure = failures[0]
            log.error("saga %s needs attention: compensation of %s failed: %s",
                      run.saga_id, done.name, failure)  # fmt: skip
            await run.write(Kind.COMPENSATION_EXHAUSTED, seq=done.seq, step=done.name,
                             attempt=run.compensation_attempts.get(done.seq, 1),
                             error=error_info(failure),
                             data={"owed": _owed(run)})  # fmt: skip
            return SagaState.NEEDS_ATTENTION
    if run.cancel_reason is not None:
        await run.write(Kind.SAGA_CANCELLED, data={"reason": run.cancel_reason})
        return SagaState.CANCELLED
    await run.write(Kind.SAGA_FAILED)
    return SagaState.FAILED


def _batches(run: SagaRun) -> list[list[tuple[int, str]]]:
    """Completed steps still owed a compensation, in the order to compensate them: reverse
    completion order, the steps of one parallel group together in one batch."""
    batches: list[list[tuple[int, str]]] = []
    last: int | None = None
    for seq, name, group in reversed(_completion_order(run)):
        if seq in run.compensated:
            continue
        done = run.done_steps.get(seq)
        if done is not None and done.compensate is None and done.child is None:
            continue
        if group is not None and group == last and batches:
            batches[-1].append((seq, name))
        else:
            batches.append([(seq, name)])
        last = group
    return batches


def _completion_order(run: SagaRun) -> list[tuple[int, str, int | None]]:
    """(seq, name, group) of completed steps in order of completion: the journal's, then
    ours."""
    order = [(c.seq, c.step, (c.data or {}).get("group")) for c in run.journal_completed]
    known = {seq for seq, _, _ in order}
    order += [(seq, d.name, d.group) for seq, d in run.done_steps.items() if seq not in known]
    return order


def _owed(run: SagaRun) -> list[str]:
    return [name for batch in _batches(run) for _, name in batch]


async def _compensate_batch(run: SagaRun, todo: list[Done]) -> list[tuple[Done, Exception]]:
    """Compensate ``todo`` concurrently (one task each if several); return the failures.
    All of them finish before a wait (:class:`Suspend`) or an error goes further."""
    if len(todo) == 1:
        err = await _compensate_one(run, todo[0])
        return [] if err is None else [(todo[0], err)]
    tasks = [asyncio.ensure_future(_compensate_one(run, d)) for d in todo]
    try:
        await asyncio.wait(tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
    waits = [t.exception() for t in tasks if isinstance(t.exception(), Suspend)]
    for t in tasks:
        exc = t.exception()
        if exc is not None and not isinstance(exc, Suspend):
            raise exc
    if waits:
        merged = waits[0]
        assert isinstance(merged, Suspend)
        for w in waits[1:]:
            assert isinstance(w, Suspend)
            merged = merged.merge(w)
        raise merged
    return [(d, err) for d, t in zip(todo, tasks, strict=True) if (err := t.result())]


async def _compensate_one(run: SagaRun, done: Done) -> Exception | None:
    if done.child is not None:
        return await compensate_child(run, done)
    if isinstance(done.compensate, Remote):
        return await remote_steps.compensate(run, done.compensate, done)
    assert done.compensate is not None
    policy = done.policy
    attempt = run.compensation_attempts.get(done.seq, 0)
    key = f"{run.saga_id}/{done.name}/compensate"
    while True:
        attempt += 1
        run.compensation_attempts[done.seq] = attempt
        await run.write(Kind.COMPENSATION_STARTED, seq=done.seq, step=done.name,
                         attempt=attempt)  # fmt: skip
        ctx = run.context(done.name, attempt, key)
        info = StepCall(saga_id=run.saga_id, saga_type=run.saga.name, step=done.name,
                        attempt=attempt, compensation=True, data=done.data,
                        result=done.result, kind=done.kind)  # fmt: skip
        ends = None if done.timeout is None else run.latest_now() + done.timeout
        try:
            await run.call(done.compensate, ctx, (done.data, done.result), info=info,
                             timeout=done.timeout, ends=ends,
                             of=policy.max_attempts)  # fmt: skip
        except Exception as exc:
            run.check_broken()
            if policy.should_retry(exc, attempt):
                delay = policy.delay(attempt)
                await run.write(Kind.COMPENSATION_RETRYING, seq=done.seq, step=done.name,
                                 attempt=attempt, error=error_info(exc),
                                 data={"retry_in": delay})  # fmt: skip
                await run.clock.sleep(delay)
                continue
            return exc
        await run.write(Kind.COMPENSATION_COMPLETED, seq=done.seq, step=done.name,
                         attempt=attempt)  # fmt: skip
        run.compensated.add(done.seq)
        return None
