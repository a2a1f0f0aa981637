"""Runs one saga: its workflow, retries, timeouts, compensation order and state changes.

A :class:`SagaRun` is built from a saga's journal (empty for a new saga). It runs the workflow
from the top; steps already in the journal return their recorded outcome without running, and
new steps run live, each outcome committed before the workflow goes on. If the workflow raises,
the completed steps are compensated in reverse order of completion. Where the workflow waits
(a durable timer, a signal, a child saga), the run unloads the saga (:class:`Suspend`) and a
later run resumes it from the journal.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from sagakit import calls
from sagakit.clock import SYSTEM_CLOCK, Clock
from sagakit.codec import decode, encode, error_info
from sagakit.definition import (
    DEFAULT_COMPENSATION_RETRY,
    Action,
    Compensation,
    RetryPolicy,
    Saga,
    StepKind,
    retry_for,
)
from sagakit.errors import (
    InvalidStep,
    NonDeterminismError,
    NotSerializable,
    PastPivot,
    SagaCancelled,
    SagaDeadlineExceeded,
    StepFailed,
    StoreError,
)
from sagakit.journal import Entry, Kind, SagaState, project
from sagakit.middleware import Middleware, StepCall
from sagakit.remote import DEFAULT_REPLY_TOPIC, Remote
from sagakit.store.base import CANCEL_SIGNAL, Store
from sagakit.workflow import StepContext, WorkflowContext

log = logging.getLogger("sagakit.engine")
T = TypeVar("T")

# The parallel group a step runs in (the seq of the group's first branch), per branch task.
GROUP: contextvars.ContextVar[int | None] = contextvars.ContextVar("sagakit_group", default=None)
Resolve = Callable[[str, int | None], Saga | None]


class ReplayExhausted(BaseException):
    """Raised into a workflow replayed only to rebuild its compensations, where it would run
    something the journal does not have. BaseException so user code does not catch it."""


class Suspend(BaseException):
    """Raised out of a workflow where it must wait: the run unloads the saga until ``until``
    (by the store's clock), or earlier if a signal in ``signals`` (name -> how many of that
    name were consumed) arrives or a child in ``children`` ends. ``effects``: something the
    saga started may still act (a child saga): a failure elsewhere waits for it."""

    def __init__(
        self,
        until: float,
        *,
        signals: dict[str, int] | None = None,
        children: list[str] | None = None,
        effects: bool = False,
    ) -> None:
        super().__init__(until)
        self.until = until
        self.signals = signals or {}
        self.children = children or []
        self.effects = effects

    def merge(self, other: Suspend) -> Suspend:
        return Suspend(
            min(self.until, other.until),
            signals={**self.signals, **other.signals},
            children=[*self.children, *other.children],
            effects=self.effects or other.effects,
        )


@dataclass(slots=True, kw_only=True)
class Done:
    """A completed step as the compensation needs it."""

    seq: int
    name: str
    compensate: Compensation | None
    policy: RetryPolicy
    timeout: float | None
    data: Any
    result: Any = None
    kind: StepKind = StepKind.COMPENSATABLE
    group: int | None = None
    child: str | None = None


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
        clock: Clock = SYSTEM_CLOCK,
        middleware: Sequence[Middleware] = (),
        resolve: Resolve | None = None,
        cancel: str | None = None,
        notify: Callable[[], None] | None = None,
        reply_topic: str = DEFAULT_REPLY_TOPIC,
        on_command: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.saga = saga
        self.saga_id = saga_id
        self.data = data
        self.deadline = deadline
        self.executor = executor
        self.clock = clock
        self.middleware = tuple(middleware)
        self.resolve = resolve
        self.notify = notify or (lambda: None)
        self.reply_topic = reply_topic  # where services send remote steps' replies
        self.on_command = on_command or (lambda: None)  # a command is in the outbox
        proj = project(journal)
        self.state = proj.state
        self.output: str | None = None
        self.error = proj.error
        self.wake_at: float | None = None  # set when the run unloaded a waiting saga
        self._next_index = proj.next_index
        self.recorded = proj.outcomes
        self.resume_attempts = proj.attempts
        # Steps started but without an outcome: a replay must call the same step there.
        self.in_flight = {
            seq: name for seq, name in proj.started_names.items() if seq not in proj.outcomes
        }
        self.started_data = proj.started_data
        self.waits = proj.waits
        self.signal_ids = proj.signal_ids
        self.journal_completed = proj.completed
        self.compensated = proj.compensated
        self.compensation_attempts = proj.compensation_attempts
        # seq -> the start entry's data of a remote compensation's current attempt
        self.compensation_sent = proj.compensation_data
        self.operator_retries = proj.operator_retries
        self.compensating = any(e.kind is Kind.SAGA_COMPENSATING for e in journal)
        self.cancel_reason: str | None = None
        if proj.cancel is not None:
            self.cancel_reason = str((proj.cancel.data or {}).get("reason", ""))
        self._cancel_pending = cancel
        self.cancel_known = self.cancel_reason is not None or cancel is not None
        self._pivot: str | None = None  # the pivot, once completed; or a retriable step
        self.seq_counter = 0
        self._names: dict[str, int] = {}
        self.done_steps: dict[int, Done] = {}
        self.replay_only = False
        self._unflushed = False
        self._broken: StoreError | None = None
        self.results: dict[str, Any] = {}

    # -- journal -----------------------------------------------------------------------------

    def _entry(self, kind: Kind, **fields: Any) -> Entry:
        index = self._next_index
        self._next_index += 1
        return Entry(saga_id=self.saga_id, index=index, kind=kind, at=self.clock.now(), **fields)

    async def write(self, kind: Kind, **fields: Any) -> None:
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

    def write_soon(self, kind: Kind, **fields: Any) -> None:
        """Queue an entry without waiting. The next ``write`` commits it first; the engine
        makes one before anything leaves the workflow (a step or compensation body runs, the
        saga ends or unloads), so an outcome is always durable before the next effect."""
        self.check_broken()  # a parallel branch of a run whose write failed: stop here too
        self.store.append_soon(self.saga_id, (self._entry(kind, **fields),))
        self._unflushed = True

    async def _before_effect(self, kind: Kind, **fields: Any) -> None:
        """Write the entry that precedes a step body: durably if earlier entries are still
        queued (they commit with it) or if this worker's lease may have lapsed (the durable
        write is fenced), else without waiting."""
        self.check_broken()
        if self._unflushed or not self.store.lease_held():
            await self.write(kind, **fields)
        else:
            self.write_soon(kind, **fields)

    def check_broken(self) -> None:
        """Once a write failed, the journal is the only truth: this run must not go on, even if
        the workflow caught the error; the runner resumes the saga from its journal."""
        if self._broken is not None:
            raise self._broken

    # -- time --------------------------------------------------------------------------------

    def earliest_now(self) -> float:
        """The store clock's lower bound now: a time is past only once this reaches it."""
        return self.store.clock_bounds()[0]

    def latest_now(self) -> float:
        """The store clock's upper bound now: a delay counts from here."""
        return self.store.clock_bounds()[1]

    # -- the whole saga ----------------------------------------------------------------------

    async def execute(self) -> SagaState:
        """Run (or resume) the saga to its next resting or waiting state and return it."""
        try:
            return await self._execute()
        except Suspend as wait:
            self.check_broken()
            return await self._suspend(wait)

    async def _execute(self) -> SagaState:
        ctx = WorkflowContext(self)
        self.replay_only = self.compensating
        try:
            output = await self.saga.run()(ctx, self.data)
        except NonDeterminismError as exc:
            self.check_broken()
            return await self.park(exc)
        except ReplayExhausted:
            return await self._compensate(None)
        except Suspend:
            raise
        except Exception as exc:
            self.check_broken()  # a store error is no business failure: do not compensate
            if self._pivot is not None and not self.compensating:
                return await self.park(PastPivot(self.saga_id, self._pivot, exc))
            return await self._compensate(exc)
        self.check_broken()
        if self.compensating or self.cancel_reason is not None:
            return await self._compensate(None)
        try:
            payload = encode(output, what=f"the output of saga {self.saga.name!r}")
        except NotSerializable as exc:
            return await self._compensate(exc)
        await self.write(Kind.SAGA_COMPLETED, payload=payload)
        self.output = payload
        return SagaState.COMPLETED

    async def replay(self) -> NonDeterminismError | None:
        """Run the workflow against the journal only, writing nothing, and return the
        non-determinism a real resume would meet (None if it would replay cleanly)."""
        self.replay_only = True
        try:
            await self.saga.run()(WorkflowContext(self), self.data)
        except NonDeterminismError as exc:
            return exc
        except (ReplayExhausted, Suspend):
            return None
        except Exception:  # a recorded failure raised again, as on a real resume
            return None
        return None

    async def park(self, exc: Exception) -> SagaState:
        log.error("saga %s needs attention: %s", self.saga_id, exc)
        await self.write(Kind.SAGA_PARKED, error=error_info(exc))
        return SagaState.NEEDS_ATTENTION

    async def _suspend(self, wait: Suspend) -> SagaState:
        until = wait.until if self.deadline is None else min(wait.until, self.deadline)
        # The store commits the entries still queued first (see Store.suspend).
        # A cancel request (one per saga) wakes it, unless it already knows of one.
        wait.signals.setdefault(CANCEL_SIGNAL, 1 if self.cancel_known else 0)
        await self.store.suspend(self.saga_id, until, wait.signals, wait.children)
        self.wake_at = until
        return SagaState.COMPENSATING if self.compensating else SagaState.RUNNING

    # -- cancellation ------------------------------------------------------------------------

    def request_cancel(self, reason: str) -> None:
        """Cancel the saga at its next step, wait or compensation (see App.cancel)."""
        self.cancel_known = True
        if self.cancel_reason is None:
            self._cancel_pending = reason

    async def take_cancel(self) -> str | None:
        """The reason the saga is cancelled, journaling a pending request first; None if it
        is not, or if it is past its pivot (a cancellation can no longer undo it)."""
        reason = self.cancel_reason if self.cancel_reason is not None else self._cancel_pending
        if reason is None:
            return None
        if self._pivot is not None:
            log.warning("saga %s ignores its cancellation: it is past its pivot %r",
                        self.saga_id, self._pivot)  # fmt: skip
            self._cancel_pending = None
            return None
        if self.cancel_reason is None:
            await self.write(Kind.CANCEL_REQUESTED, data={"reason": reason})
            self.cancel_reason = reason
        return reason

    async def cancel_point(self) -> None:
        """Where the workflow is about to start something new: raise :class:`SagaCancelled`
        if the saga is cancelled. Something already started runs to its outcome first, so
        that it is compensated if it completed."""
        reason = await self.take_cancel()
        if reason is not None:
            raise SagaCancelled(self.saga_id, reason)

    # -- steps -------------------------------------------------------------------------------

    def next(self, name: str) -> tuple[int, str]:
        seq = self.seq_counter
        self.seq_counter += 1
        n = self._names.get(name, 0) + 1
        self._names[name] = n
        return seq, name if n == 1 else f"{name}#{n}"

    def mismatch(self, seq: int, got: str) -> NonDeterminismError | None:
        """The non-determinism of calling ``got`` at ``seq``, or None if the journal agrees."""
        rec = self.recorded.get(seq)
        if rec is not None:
            recorded = identity(rec)
        elif seq in self.in_flight:
            recorded = f"step {self.in_flight[seq]!r}"
        elif seq in self.waits:
            recorded = identity(self.waits[seq])
        else:
            return None
        return None if recorded == got else NonDeterminismError(self.saga_id, seq, recorded, got)

    def record_value(self, name: str, make: Callable[[], T]) -> T:
        """Return the value recorded at this point of the journal, or make and record one."""
        self.check_broken()
        seq, _ = self.next(f"ctx.{name}")
        if (problem := self.mismatch(seq, f"ctx.{name}()")) is not None:
            raise problem
        rec = self.recorded.get(seq)
        if rec is not None:
            value: T = (rec.data or {})["value"]
            return value
        if self.replay_only:
            raise ReplayExhausted
        value = make()
        self.write_soon(Kind.VALUE_RECORDED, seq=seq, data={"name": name, "value": value})
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
        kind: StepKind = StepKind.COMPENSATABLE,
    ) -> Any:
        self.check_broken()
        seq, name = self.next(name)
        done = Done(
            seq=seq,
            name=name,
            compensate=compensate,
            policy=compensate_retry or DEFAULT_COMPENSATION_RETRY,
            timeout=timeout,
            data=data,
            kind=kind,
            group=GROUP.get(),
        )
        if (problem := self.mismatch(seq, f"step {name!r}")) is not None:
            raise problem
        rec = self.recorded.get(seq)
        if rec is not None:
            if rec.kind is Kind.STEP_FAILED:
                if (rec.data or {}).get("uncertain"):
                    self.done_steps[seq] = done  # a timed-out remote step may have acted
                raise StepFailed(self.saga_id, name, rec.attempt or 1, rec.error or {})
            return self.completed(done, decode(rec.payload, calls.return_hint(action)))
        if self.replay_only:
            self.check_deadline(name)
            raise ReplayExhausted
        if seq not in self.in_flight:  # an in-flight step runs to its outcome first
            await self.cancel_point()
            self._check_kind(done)
        if isinstance(action, Remote):
            from sagakit import remote_steps

            return await remote_steps.run_step(self, action, done, retry_for(kind, retry))
        return await self._run_step(action, done, retry_for(kind, retry))

    def _check_kind(self, done: Done) -> None:
        if done.kind is StepKind.COMPENSATABLE and done.compensate is not None and self._pivot:
            raise InvalidStep(
                self.saga.name,
                done.name,
                f"it has a compensation but runs after {self._pivot!r}, past the point of no "
                "return, where nothing is compensated; mark it retriable=True or move it earlier",
            )
        if done.kind is StepKind.RETRIABLE:
            self._pivot = self._pivot or done.name

    def completed(self, done: Done, result: Any) -> Any:
        done.result = result
        self.done_steps[done.seq] = done
        self.results[done.name] = result
        if done.kind is not StepKind.COMPENSATABLE:
            self._pivot = self._pivot or done.name
        return result

    def check_deadline(self, name: str) -> None:
        if self.deadline is not None and self.earliest_now() >= self.deadline:
            raise SagaDeadlineExceeded(self.saga_id, name, self.deadline)

    def step_data(self, done: Done) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if done.group is not None:
            data["group"] = done.group
        if done.kind is not StepKind.COMPENSATABLE:
            data["kind"] = done.kind.value
        return data

    async def _run_step(self, action: Action, done: Done, policy: RetryPolicy) -> Any:
        seq, name = done.seq, done.name
        attempt = self.resume_attempts.pop(seq, 1)
        recorded = self.started_data.pop(seq, {})
        extra = self.step_data(done)
        while True:
            self.check_deadline(name)
            ends: float | None = None
            if done.timeout is not None:
                # A re-run of an attempt started before a crash keeps its original deadline.
                ends = recorded.get("ends") or self.latest_now() + done.timeout
                recorded = {}
            fields = {**extra, "ends": ends} if ends is not None else extra
            await self._before_effect(Kind.STEP_STARTED, seq=seq, step=name, attempt=attempt,
                                      data=fields or None)  # fmt: skip
            ctx = self.context(name, attempt, f"{self.saga_id}/{name}")
            info = StepCall(saga_id=self.saga_id, saga_type=self.saga.name, step=name,
                            attempt=attempt, compensation=False, data=done.data,
                            kind=done.kind)  # fmt: skip
            try:
                result = await self.call(action, ctx, (done.data,), info=info,
                                          timeout=done.timeout, ends=ends,
                                          of=policy.max_attempts)  # fmt: skip
                payload = encode(result, what=f"the result of step {name!r}")
            except Exception as exc:
                self.check_broken()
                if not isinstance(exc, NotSerializable) and policy.should_retry(exc, attempt):
                    delay = policy.delay(attempt)
                    log.warning("step %s of saga %s failed (attempt %d): %s; retrying in %.3fs",
                                name, self.saga_id, attempt, exc, delay)  # fmt: skip
                    await self.write(Kind.STEP_RETRYING, seq=seq, step=name, attempt=attempt,
                                     error=error_info(exc), data={"retry_in": delay})  # fmt: skip
                    await self.clock.sleep(delay)
                    attempt += 1
                    continue
                err = error_info(exc)
                await self.write(Kind.STEP_FAILED, seq=seq, step=name, attempt=attempt, error=err,
                                 data=extra or None)  # fmt: skip
                raise StepFailed(self.saga_id, name, attempt, err) from exc
            # Durable before the next step body runs or the saga ends: see _before_effect.
            self.write_soon(Kind.STEP_COMPLETED, seq=seq, step=name, attempt=attempt,
                            payload=payload, data=extra or None)  # fmt: skip
            # Hand back the decoded copy, so the live run sees exactly what a replay will.
            return self.completed(done, decode(payload, calls.return_hint(action)))

    def context(self, name: str, attempt: int, key: str) -> StepContext:
        return StepContext(
            saga_id=self.saga_id,
            saga_type=self.saga.name,
            step=name,
            attempt=attempt,
            idempotency_key=key,
            results=self.results,
        )

    async def call(
        self,
        fn: Callable[..., Any],
        ctx: StepContext,
        args: tuple[Any, ...],
        *,
        info: StepCall,
        timeout: float | None,
        ends: float | None,
        of: int,
    ) -> Any:
        remaining = None if ends is None else ends - self.earliest_now()
        return await calls.call(fn, ctx, args, executor=self.executor, clock=self.clock,
                                middleware=self.middleware, info=info, remaining=remaining,
                                timeout=timeout or 0.0, of=of)  # fmt: skip

    # -- compensation ------------------------------------------------------------------------

    async def _compensate(self, exc: Exception | None) -> SagaState:
        from sagakit.compensation import compensate

        return await compensate(self, exc)


def identity(e: Entry) -> str:
    """What a journal entry records, in the words a replay mismatch reports."""
    data = e.data or {}
    if e.kind is Kind.VALUE_RECORDED:
        return f"ctx.{data.get('name')}()"
    if e.kind in (Kind.TIMER_STARTED, Kind.TIMER_FIRED):
        return "ctx.sleep()"
    if e.kind in (Kind.SIGNAL_WAITING, Kind.SIGNAL_RECEIVED, Kind.SIGNAL_TIMED_OUT):
        return f"ctx.wait_for_signal({data.get('waited', data.get('name'))!r})"
    return f"step {e.step!r}"
