"""Runs one saga: its workflow, retries, timeouts, compensation order and state changes.

A :class:`SagaRun` is built from a saga's journal (empty for a new saga). It runs the workflow
from the top; steps already in the journal return their recorded outcome without running, and
new steps run live, each outcome committed before the workflow goes on. If the workflow raises,
the completed steps are compensated in reverse order of completion.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import typing
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from sagakit.codec import decode, encode, error_info
from sagakit.definition import (
    DEFAULT_COMPENSATION_RETRY,
    NO_RETRY,
    Action,
    Compensation,
    RetryPolicy,
    Saga,
)
from sagakit.errors import (
    NonDeterminismError,
    NotSerializable,
    SagaDeadlineExceeded,
    StepFailed,
    StepTimedOut,
    StoreError,
)
from sagakit.journal import Entry, Kind, SagaState, project
from sagakit.store.base import Store
from sagakit.workflow import StepContext, WorkflowContext

log = logging.getLogger("sagakit.engine")
T = TypeVar("T")


class _ReplayExhausted(BaseException):
    """Raised into a workflow replayed only to rebuild its compensations, where it would run
    a step the journal does not have. BaseException so user code does not catch it."""


@dataclass(slots=True, kw_only=True)
class _Done:
    """A completed step as the compensation needs it."""

    seq: int
    name: str
    compensate: Compensation | None
    policy: RetryPolicy
    timeout: float | None
    data: Any
    result: Any


@functools.cache
def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )


@functools.cache
def _return_hint(fn: Callable[..., Any]) -> Any:
    try:
        return typing.get_type_hints(fn).get("return")
    except Exception:  # unresolvable annotations: decode to plain JSON values
        return None


class SagaRun:
    """The execution of one saga by this process."""

    def __init__(
        self,
        *,
        store: Store,
        saga: Saga,
        saga_id: str,
        data: Any,
        deadline: float | None,
        journal: Sequence[Entry],
        executor: Executor | None = None,
    ) -> None:
        self.store = store
        self.saga = saga
        self.saga_id = saga_id
        self.data = data
        self.deadline = deadline
        self.executor = executor
        proj = project(journal)
        self.state = proj.state
        self.output: str | None = None
        self.error = proj.error
        self._next_index = proj.next_index
        self._recorded = proj.outcomes
        self._resume_attempts = proj.attempts
        # Steps started but without an outcome: a replay must call the same step there.
        self._in_flight = {
            seq: name for seq, name in proj.started_names.items() if seq not in proj.outcomes
        }
        self._journal_completed = proj.completed
        self._compensated = proj.compensated
        self._compensation_attempts = proj.compensation_attempts
        self._compensating = any(e.kind is Kind.SAGA_COMPENSATING for e in journal)
        self._seq = 0
        self._names: dict[str, int] = {}
        self._done: dict[int, _Done] = {}
        self._replay_only = False
        self._unflushed = False
        self._broken: StoreError | None = None
        self.results: dict[str, Any] = {}

    # -- journal -----------------------------------------------------------------------------

    def _entry(self, kind: Kind, **fields: Any) -> Entry:
        index = self._next_index
        self._next_index += 1
        return Entry(saga_id=self.saga_id, index=index, kind=kind, at=time.time(), **fields)

    async def _write(self, kind: Kind, **fields: Any) -> None:
        """Append an entry and wait until it, and every entry queued before it, is durable."""
        entry = self._entry(kind, **fields)
        try:
            await self.store.append(self.saga_id, (entry,))
        except StoreError as exc:
            self._broken = exc
            raise
        self._unflushed = False
        if entry.error is not None:
            self.error = entry.error

    def _write_soon(self, kind: Kind, **fields: Any) -> None:
        """Queue an entry without waiting. The next ``_write`` commits it first; the engine
        makes one before anything leaves the workflow (a step or compensation body runs, the
        saga ends), so an outcome is always durable before the next effect."""
        self.store.append_soon(self.saga_id, (self._entry(kind, **fields),))
        self._unflushed = True

    async def _before_effect(self, kind: Kind, **fields: Any) -> None:
        """Write the entry that precedes a step body: durably if earlier entries are still
        queued (they commit with it) or if this worker's lease may have lapsed (the durable
        write is fenced), else without waiting."""
        self._check_broken()
        if self._unflushed or not self.store.lease_held():
            await self._write(kind, **fields)
        else:
            self._write_soon(kind, **fields)

    def _check_broken(self) -> None:
        """Once a write failed, the journal is the only truth: this run must not go on, even if
        the workflow caught the error; the runner resumes the saga from its journal."""
        if self._broken is not None:
            raise self._broken

    # -- the whole saga ----------------------------------------------------------------------

    async def execute(self) -> SagaState:
        """Run (or resume) the saga to its next resting state and return that state."""
        ctx = WorkflowContext(self)
        self._replay_only = self._compensating
        try:
            output = await self.saga.run()(ctx, self.data)
        except NonDeterminismError as exc:
            self._check_broken()
            return await self._park(exc)
        except _ReplayExhausted:
            return await self._compensate(None)
        except Exception as exc:
            self._check_broken()  # a store error is no business failure: do not compensate
            return await self._compensate(exc)
        self._check_broken()
        if self._compensating:
            return await self._compensate(None)
        try:
            payload = encode(output, what=f"the output of saga {self.saga.name!r}")
        except NotSerializable as exc:
            return await self._compensate(exc)
        await self._write(Kind.SAGA_COMPLETED, payload=payload)
        self.output = payload
        return SagaState.COMPLETED

    async def replay(self) -> NonDeterminismError | None:
        """Run the workflow against the journal only, writing nothing, and return the
        non-determinism a real resume would meet (None if it would replay cleanly)."""
        self._replay_only = True
        try:
            await self.saga.run()(WorkflowContext(self), self.data)
        except NonDeterminismError as exc:
            return exc
        except _ReplayExhausted:
            return None
        except Exception:  # a recorded failure raised again, as on a real resume
            return None
        return None

    async def _park(self, exc: Exception) -> SagaState:
        log.error("saga %s needs attention: %s", self.saga_id, exc)
        await self._write(Kind.SAGA_PARKED, error=error_info(exc))
        return SagaState.NEEDS_ATTENTION

    # -- steps -------------------------------------------------------------------------------

    def _next(self, name: str) -> tuple[int, str]:
        seq = self._seq
        self._seq += 1
        n = self._names.get(name, 0) + 1
        self._names[name] = n
        return seq, name if n == 1 else f"{name}#{n}"

    def record_value(self, name: str, make: Callable[[], T]) -> T:
        """Return the value recorded at this point of the journal, or make and record one."""
        self._check_broken()
        seq, _ = self._next(f"ctx.{name}")
        rec = self._recorded.get(seq)
        if rec is not None:
            recorded = (rec.data or {}).get("name") if rec.kind is Kind.VALUE_RECORDED else rec.step
            if recorded != name:
                raise NonDeterminismError(self.saga_id, seq, f"{recorded!r}", f"ctx.{name}()")
            value: T = (rec.data or {})["value"]
            return value
        if seq in self._in_flight:
            got = f"ctx.{name}()"
            raise NonDeterminismError(self.saga_id, seq, f"step {self._in_flight[seq]!r}", got)
        if self._replay_only:
            raise _ReplayExhausted
        value = make()
        self._write_soon(Kind.VALUE_RECORDED, seq=seq, data={"name": name, "value": value})
        return value

    async def step(
        self,
        action: Action,
        data: Any,
        *,
        name: str,
        compensate: Compensation | None,
        retry: RetryPolicy | None,
        compensate_retry: RetryPolicy | None,
        timeout: float | None,
    ) -> Any:
        self._check_broken()
        seq, name = self._next(name)
        done = _Done(
            seq=seq,
            name=name,
            compensate=compensate,
            policy=compensate_retry or DEFAULT_COMPENSATION_RETRY,
            timeout=timeout,
            data=data,
            result=None,
        )
        rec = self._recorded.get(seq)
        if rec is not None:
            if rec.kind is Kind.VALUE_RECORDED or rec.step != name:
                got = (rec.data or {}).get("name") if rec.kind is Kind.VALUE_RECORDED else rec.step
                raise NonDeterminismError(self.saga_id, seq, f"step {got!r}", f"step {name!r}")
            if rec.kind is Kind.STEP_FAILED:
                raise StepFailed(self.saga_id, name, rec.attempt or 1, rec.error or {})
            return self._completed(done, decode(rec.payload, _return_hint(action)))
        started = self._in_flight.get(seq)
        if started is not None and started != name:
            raise NonDeterminismError(self.saga_id, seq, f"step {started!r}", f"step {name!r}")
        if self._replay_only:
            self._check_deadline(name)
            raise _ReplayExhausted
        return await self._run_step(action, done, retry or NO_RETRY)

    def _completed(self, done: _Done, result: Any) -> Any:
        done.result = result
        self._done[done.seq] = done
        self.results[done.name] = result
        return result

    def _check_deadline(self, name: str) -> None:
        if self.deadline is not None and time.time() >= self.deadline:
            raise SagaDeadlineExceeded(self.saga_id, name, self.deadline)

    async def _run_step(self, action: Action, done: _Done, policy: RetryPolicy) -> Any:
        seq, name = done.seq, done.name
        attempt = self._resume_attempts.pop(seq, 1)
        while True:
            self._check_deadline(name)
            await self._before_effect(Kind.STEP_STARTED, seq=seq, step=name, attempt=attempt)
            ctx = self._context(name, attempt, f"{self.saga_id}/{name}")
            try:
                result = await self._call(action, ctx, (done.data,), done.timeout, policy)
                payload = encode(result, what=f"the result of step {name!r}")
            except Exception as exc:
                if not isinstance(exc, NotSerializable) and policy.should_retry(exc, attempt):
                    delay = policy.delay(attempt)
                    log.warning("step %s of saga %s failed (attempt %d): %s; retrying in %.3fs",
                                name, self.saga_id, attempt, exc, delay)  # fmt: skip
                    await self._write(Kind.STEP_RETRYING, seq=seq, step=name, attempt=attempt,
                                      error=error_info(exc), data={"retry_in": delay})  # fmt: skip
                    await asyncio.sleep(delay)
                    attempt += 1
                    continue
                err = error_info(exc)
                await self._write(Kind.STEP_FAILED, seq=seq, step=name, attempt=attempt, error=err)
                raise StepFailed(self.saga_id, name, attempt, err) from exc
            # Durable before the next step body runs or the saga ends: see _before_effect.
            self._write_soon(Kind.STEP_COMPLETED, seq=seq, step=name, attempt=attempt,
                             payload=payload)  # fmt: skip
            # Hand back the decoded copy, so the live run sees exactly what a replay will.
            return self._completed(done, decode(payload, _return_hint(action)))

    def _context(self, name: str, attempt: int, key: str) -> StepContext:
        return StepContext(
            saga_id=self.saga_id,
            saga_type=self.saga.name,
            step=name,
            attempt=attempt,
            idempotency_key=key,
            results=self.results,
        )

    async def _call(
        self,
        fn: Callable[..., Any],
        ctx: StepContext,
        args: tuple[Any, ...],
        timeout: float | None,
        policy: RetryPolicy,
    ) -> Any:
        if _is_async(fn):
            awaitable = fn(ctx, *args)
        else:
            loop = asyncio.get_running_loop()
            awaitable = loop.run_in_executor(self.executor, functools.partial(fn, ctx, *args))
        if timeout is None:
            return await awaitable
        try:
            async with asyncio.timeout(timeout) as scope:
                return await awaitable
        except TimeoutError as exc:
            if not scope.expired():
                raise  # the step's own TimeoutError, not ours
            raise StepTimedOut(
                self.saga_id, ctx.step, after=timeout, attempt=ctx.attempt, of=policy.max_attempts
            ) from exc

    # -- compensation ------------------------------------------------------------------------

    async def _compensate(self, exc: Exception | None) -> SagaState:
        if not self._compensating:
            err = error_info(exc) if exc is not None else None
            log.info("saga %s compensating: %s", self.saga_id, exc)
            await self._write(Kind.SAGA_COMPENSATING, error=err)
            self._compensating = True
        for seq, name in reversed(self._completion_order()):
            if seq in self._compensated:
                continue
            done = self._done.get(seq)
            if done is None:
                why = "no step (the replay ended before it)"
                return await self._park(
                    NonDeterminismError(self.saga_id, seq, f"step {name!r}", why)
                )
            if done.compensate is not None and not await self._compensate_one(done):
                return SagaState.NEEDS_ATTENTION
        await self._write(Kind.SAGA_FAILED)
        return SagaState.FAILED

    def _completion_order(self) -> list[tuple[int, str]]:
        """(seq, name) of completed steps in order of completion: the journal's, then ours."""
        order = [(c.seq, c.step) for c in self._journal_completed]
        known = {seq for seq, _ in order}
        order += [(seq, d.name) for seq, d in self._done.items() if seq not in known]
        return order

    def _owed(self) -> list[str]:
        return [
            name
            for seq, name in reversed(self._completion_order())
            if seq not in self._compensated
            and (seq not in self._done or self._done[seq].compensate is not None)
        ]

    async def _compensate_one(self, done: _Done) -> bool:
        assert done.compensate is not None
        policy = done.policy
        attempt = self._compensation_attempts.get(done.seq, 0)
        key = f"{self.saga_id}/{done.name}/compensate"
        while True:
            attempt += 1
            await self._write(Kind.COMPENSATION_STARTED, seq=done.seq, step=done.name,
                              attempt=attempt)  # fmt: skip
            ctx = self._context(done.name, attempt, key)
            try:
                await self._call(done.compensate, ctx, (done.data, done.result), done.timeout,
                                 policy)  # fmt: skip
            except Exception as exc:
                if policy.should_retry(exc, attempt):
                    delay = policy.delay(attempt)
                    await self._write(Kind.COMPENSATION_RETRYING, seq=done.seq, step=done.name,
                                      attempt=attempt, error=error_info(exc),
                                      data={"retry_in": delay})  # fmt: skip
                    await asyncio.sleep(delay)
                    continue
                owed = self._owed()
                log.error("saga %s needs attention: compensation of %s failed: %s",
                          self.saga_id, done.name, exc)  # fmt: skip
                await self._write(Kind.COMPENSATION_EXHAUSTED, seq=done.seq, step=done.name,
                                  attempt=attempt, error=error_info(exc),
                                  data={"owed": owed})  # fmt: skip
                return False
            await self._write(Kind.COMPENSATION_COMPLETED, seq=done.seq, step=done.name,
                              attempt=attempt)  # fmt: skip
            self._compensated.add(done.seq)
            return True
