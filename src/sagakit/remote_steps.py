"""How the engine runs a remote step or compensation: command out, wait, reply in.

Each attempt journals its start with the command envelope in the entry's payload and the topic
in its data; the store copies it into the outbox in that same transaction (a trigger), and the
relay publishes it after commit. The run then looks for the reply among the saga's stored
signals (the reply consumer stores each reply as signal ``sagakit.reply.<command id>``) and
unloads the saga until it comes or the attempt's deadline passes. A step that timed out may
still have acted in its service: it is compensated like a completed one (with result None),
so remote compensations must accept that.

Middleware see each attempt twice (:mod:`sagakit.middleware`): its send passes through
``Middleware.step`` (the command is made and journaled inside ``proceed``, so it carries the
context the middleware set), and the journaling of its outcome through
``Middleware.remote_done``, in the run that learns it. The start entry's data keeps what the
second needs in a later run or another process: ``sent_at`` and the command's trace context.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from sagakit.codec import decode, error_info
from sagakit.definition import RetryPolicy
from sagakit.engine import Done, Suspend
from sagakit.errors import NotSerializable, StepFailed, StepTimedOut
from sagakit.journal import Kind
from sagakit.messaging.envelope import Envelope
from sagakit.middleware import Outcome, Proceed, RemoteDone, StepCall, chain, chain_remote_done
from sagakit.observability.messages import command_fields
from sagakit.remote import COMPLETED, REPLY_SIGNAL, Remote, RemoteStepFailed, command_id
from sagakit.store.base import WAIT_FOREVER

if TYPE_CHECKING:
    from sagakit.engine import SagaRun

log = logging.getLogger("sagakit.engine")


def _command(run: SagaRun, command: Remote, done: Done, call: StepCall, now: float) -> Envelope:
    compensation = call.compensation
    suffix = "/compensate" if compensation else ""
    data = {"input": done.data, "result": done.result} if compensation else done.data
    return Envelope.new(
        command.command,
        data,
        **command_fields(),  # the context the middleware made the send in goes on in the service
        correlation_id=run.saga_id,
        message_id=_command_id(run, done, call.attempt, compensation=compensation),
        reply_to=run.reply_topic,
        timestamp=now,
        headers={
            "idempotency_key": f"{run.saga_id}/{done.name}{suffix}",
            "attempt": str(call.attempt),
            "step": done.name,
            "saga_type": run.saga.name,
            "compensation": "1" if compensation else "0",
        },
    )


def _call(run: SagaRun, command: Remote, done: Done, attempt: int, *, undo: bool) -> StepCall:
    return StepCall(saga_id=run.saga_id, saga_type=run.saga.name, step=done.name,
                    attempt=attempt, compensation=undo, data=done.data,
                    result=done.result if undo else None, kind=done.kind,
                    command=command.command)  # fmt: skip


async def _send(
    run: SagaRun, command: Remote, done: Done, call: StepCall, data: dict[str, Any]
) -> tuple[dict[str, Any], RemoteDone | None]:
    """Send the attempt's command through the step middleware: the data journaled with it,
    and no report; or, if a middleware failed the send before the command was made, a
    report of that failure."""
    sent: dict[str, Any] = {}

    async def body() -> None:
        now = run.clock.now()
        env = _command(run, command, done, call, now)
        trace = {"traceparent": env.traceparent, "tracestate": env.tracestate}
        sent.update(data, sent_at=now, **{k: v for k, v in trace.items() if v})
        kind = Kind.COMPENSATION_STARTED if call.compensation else Kind.STEP_STARTED
        await run.write(kind, seq=done.seq, step=done.name, attempt=call.attempt,
                        payload=env.to_json(), data=sent)  # fmt: skip
        run.on_command()

    try:
        await (chain(run.middleware, call, body) if run.middleware else body)()
    except Exception as exc:
        run.check_broken()
        if isinstance(exc, NotSerializable) and not sent:
            raise  # the step's input cannot be sent: no attempt helps
        if not sent:  # failed before the command was made: the attempt failed
            now = run.clock.now()
            return data, RemoteDone(call=call, outcome="failed", error=exc, sent_at=now,
                                    done_at=now)  # fmt: skip
        log.exception("middleware failed after sending %s of saga %s (attempt %d); its reply "
                      "decides the outcome", call.step, run.saga_id, call.attempt)  # fmt: skip
    if not sent:  # a middleware returned without proceeding: only the service can answer
        await body()
    return sent, None


async def _reply(run: SagaRun, message_id: str) -> tuple[str, str | None, float] | None:
    """The stored reply (type, payload JSON, when stored) to command ``message_id``, if any."""
    for s in await run.store.signals(run.saga_id, REPLY_SIGNAL + message_id):
        stored = decode(s.payload) or {}
        return str(stored.get("type")), stored.get("payload"), s.at
    return None


def _command_id(run: SagaRun, done: Done, attempt: int, *, compensation: bool) -> str:
    """The attempt's command id. Compensation attempts count from 1 again after an operator
    retry, so their ids include how many retries came before; a step's attempts go on
    counting, so its ids need not."""
    again = run.operator_retries if compensation else 0
    return command_id(run.saga_id, done.name, attempt, compensation=compensation,
                      retry_round=again)  # fmt: skip


async def _ignore_late(run: SagaRun, done: Done, attempt: int, *, compensation: bool) -> None:
    """Journal (once) the replies to this step's earlier attempts, which timed out."""
    for earlier in range(1, attempt):
        mid = _command_id(run, done, earlier, compensation=compensation)
        if mid in run.signal_ids:
            continue
        if await _reply(run, mid) is not None:
            run.signal_ids.add(mid)
            run.write_soon(Kind.REPLY_IGNORED, seq=done.seq, step=done.name, attempt=earlier,
                           data={"signal_id": mid, "reason": "it came after its attempt timed "
                                 "out"})  # fmt: skip


async def _attempt(
    run: SagaRun,
    command: Remote,
    done: Done,
    call: StepCall,
    sent: dict[str, Any] | None,
    *,
    policy: RetryPolicy,
) -> tuple[dict[str, Any], RemoteDone, str | None]:
    """Send the attempt's command unless ``sent`` (its start entry's data) shows it was, and
    return what its start journaled, its outcome and a completed one's result payload; or
    unload the saga until the outcome comes."""
    undo, attempt = call.compensation, call.attempt
    mid = _command_id(run, done, attempt, compensation=undo)
    if sent is None or sent.get("message_id") != mid:
        if not undo:
            run.check_deadline(done.name)
        ends = None if done.timeout is None else run.latest_now() + done.timeout
        data = {**({} if undo else run.step_data(done)), "topic": command.command,
                "message_id": mid, "ends": ends}  # fmt: skip
        sent, failed = await _send(run, command, done, call, data)
        if failed is not None:
            return sent, failed, None
    await _ignore_late(run, done, attempt, compensation=undo)
    found = await _outcome(run, command, done, call, sent, policy=policy)
    if found is None:
        raise Suspend(sent.get("ends") or WAIT_FOREVER, signals={REPLY_SIGNAL + mid: 0},
                      effects=True)  # fmt: skip
    return sent, *found


async def _outcome(
    run: SagaRun,
    command: Remote,
    done: Done,
    call: StepCall,
    sent: dict[str, Any],
    *,
    policy: RetryPolicy,
) -> tuple[RemoteDone, str | None] | None:
    """The attempt's outcome and a completed one's result payload, or None while awaited."""
    mid = str(sent.get("message_id"))
    found = await _reply(run, mid)
    if found is not None:
        kind, payload, done_at = found
        run.signal_ids.add(mid)
        if kind == COMPLETED:
            return _report(call, sent, "completed", None, done_at), payload
        error = decode(payload) or {}
        failed = RemoteStepFailed(command.command, str(error.get("type", "Exception")),
                                  str(error.get("message", "")))  # fmt: skip
        return _report(call, sent, "failed", failed, done_at), None
    ends = sent.get("ends")
    if ends is None or run.earliest_now() < ends:
        return None
    timed_out = StepTimedOut(run.saga_id, done.name, after=done.timeout or 0.0,
                             attempt=call.attempt, of=policy.max_attempts)  # fmt: skip
    return _report(call, sent, "timed_out", timed_out, run.clock.now()), None


def _report(
    call: StepCall, sent: dict[str, Any], outcome: Outcome, error: Exception | None, at: float
) -> RemoteDone:
    sent_at = sent.get("sent_at")
    return RemoteDone(call=call, outcome=outcome, error=error,
                      sent_at=at if sent_at is None else min(float(sent_at), at), done_at=at,
                      traceparent=sent.get("traceparent"),
                      tracestate=sent.get("tracestate"))  # fmt: skip


async def _retrying(run: SagaRun, seq: int, report: RemoteDone, delay: float, kind: Kind) -> None:
    """Journal that a failed attempt is followed by another after ``delay``, and log it."""
    call, error = report.call, report.error
    what = "compensation of step" if call.compensation else "step"
    log.warning("%s %s of saga %s failed (attempt %d): %s; retrying in %.3fs", what,
                call.step, run.saga_id, call.attempt, error, delay)  # fmt: skip
    assert error is not None
    await run.write(kind, seq=seq, step=call.step, attempt=call.attempt,
                    error=error_info(error), data={"retry_in": delay})  # fmt: skip


def _nothing() -> None:
    return None


async def _record(run: SagaRun, report: RemoteDone, body: Callable[[], Any]) -> None:
    """Journal an outcome (``body``) through the middleware's ``remote_done``, whose errors
    cannot change the outcome: they are logged, and the outcome is journaled regardless."""
    recorded = False

    async def proceed() -> None:
        nonlocal recorded
        recorded = True
        result = body()
        if result is not None:
            await result

    chained: Proceed = chain_remote_done(run.middleware, report, proceed)
    try:
        await chained()
    except Exception:
        run.check_broken()
        log.exception("middleware failed on the outcome of %s of saga %s (attempt %d); the "
                      "outcome stands", report.call.step, run.saga_id,
                      report.call.attempt)  # fmt: skip
    if not recorded:
        await proceed()


async def run_step(run: SagaRun, command: Remote, done: Done, policy: RetryPolicy) -> Any:
    """Run a remote step to its outcome: its result, or StepFailed."""
    attempt = run.resume_attempts.pop(done.seq, 1)
    sent: dict[str, Any] | None = run.started_data.pop(done.seq, None)
    extra = run.step_data(done) or None
    while True:
        call = _call(run, command, done, attempt, undo=False)
        sent, report, payload = await _attempt(run, command, done, call, sent, policy=policy)
        at = {"seq": done.seq, "step": done.name, "attempt": attempt}
        exc = report.error
        if exc is None:
            # Durable before the next step's command leaves or the saga ends (write_soon).
            await _record(run, report, partial(run.write_soon, Kind.STEP_COMPLETED, **at,
                                               payload=payload, data=extra))  # fmt: skip
            return run.completed(done, decode(payload))
        assert isinstance(exc, Exception)
        if policy.should_retry(exc, attempt):
            delay = policy.delay(attempt)
            await _record(
                run, report, partial(_retrying, run, done.seq, report, delay, Kind.STEP_RETRYING)
            )
            await run.clock.sleep(delay)
            attempt, sent = attempt + 1, None
            continue
        uncertain = isinstance(exc, StepTimedOut)
        err = error_info(exc)
        data = {**(extra or {}), "uncertain": True} if uncertain else extra
        await _record(run, report, partial(run.write, Kind.STEP_FAILED, **at, error=err,
                                           data=data))  # fmt: skip
        if uncertain:
            run.done_steps[done.seq] = done  # it may have acted: compensate it
        raise StepFailed(run.saga_id, done.name, attempt, err) from exc


async def compensate(run: SagaRun, command: Remote, done: Done) -> Exception | None:
    """Run a remote compensation to its end: None, or the error it failed with for good."""
    policy = done.policy
    attempt = max(run.compensation_attempts.get(done.seq, 1), 1)
    sent = run.compensation_sent.get(done.seq)
    while True:
        run.compensation_attempts[done.seq] = attempt
        call = _call(run, command, done, attempt, undo=True)
        sent, report, _ = await _attempt(run, command, done, call, sent, policy=policy)
        at = {"seq": done.seq, "step": done.name, "attempt": attempt}
        exc = report.error
        if exc is None:
            await _record(run, report, partial(run.write, Kind.COMPENSATION_COMPLETED, **at))
            run.compensated.add(done.seq)
            return None
        assert isinstance(exc, Exception)
        if not policy.should_retry(exc, attempt):
            # Journaled by the caller, with what is still owed.
            await _record(run, report, _nothing)
            return exc
        delay = policy.delay(attempt)
        await _record(run, report, partial(_retrying, run, done.seq, report, delay,
                                           Kind.COMPENSATION_RETRYING))  # fmt: skip
        await run.clock.sleep(delay)
        attempt, sent = attempt + 1, None
