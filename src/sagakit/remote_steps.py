"""How the engine runs a remote step or compensation: command out, wait, reply in.

Each attempt journals its start with the command envelope in the entry's payload and the topic
in its data; the store copies it into the outbox in that same transaction (a trigger), and the
relay publishes it after commit. The run then looks for the reply among the saga's stored
signals (the reply consumer stores each reply as signal ``sagakit.reply.<command id>``) and
unloads the saga until it comes or the attempt's deadline passes. A step that timed out may
still have acted in its service: it is compensated like a completed one (with result None), so
remote compensations must accept that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sagakit.codec import decode, error_info
from sagakit.definition import RetryPolicy
from sagakit.engine import Done, Suspend
from sagakit.errors import StepFailed, StepTimedOut
from sagakit.journal import Kind
from sagakit.messaging.envelope import Envelope
from sagakit.observability.messages import command_fields
from sagakit.remote import COMPLETED, REPLY_SIGNAL, Remote, RemoteStepFailed, command_id
from sagakit.store.base import WAIT_FOREVER

if TYPE_CHECKING:
    from sagakit.engine import SagaRun


def _command(
    run: SagaRun, command: Remote, done: Done, attempt: int, *, compensation: bool
) -> Envelope:
    suffix = "/compensate" if compensation else ""
    data = {"input": done.data, "result": done.result} if compensation else done.data
    return Envelope.new(
        command.command,
        data,
        **command_fields(),  # the saga run's trace goes on in the service
        correlation_id=run.saga_id,
        message_id=command_id(run.saga_id, done.name, attempt, compensation=compensation),
        reply_to=run.reply_topic,
        timestamp=run.clock.now(),
        headers={
            "idempotency_key": f"{run.saga_id}/{done.name}{suffix}",
            "attempt": str(attempt),
            "step": done.name,
            "saga_type": run.saga.name,
            "compensation": "1" if compensation else "0",
        },
    )


async def _reply(run: SagaRun, message_id: str) -> tuple[str, str | None] | None:
    """The stored reply (type, payload JSON) to command ``message_id``, if any."""
    name = REPLY_SIGNAL + message_id
    for s in await run.store.signals(run.saga_id):
        if s.name == name:
            stored = decode(s.payload) or {}
            return str(stored.get("type")), stored.get("payload")
    return None


async def _ignore_late(run: SagaRun, done: Done, attempt: int, *, compensation: bool) -> None:
    """Journal (once) the replies to this step's earlier attempts, which timed out."""
    for earlier in range(1, attempt):
        mid = command_id(run.saga_id, done.name, earlier, compensation=compensation)
        if mid in run.signal_ids:
            continue
        if await _reply(run, mid) is not None:
            run.signal_ids.add(mid)
            run.write_soon(Kind.REPLY_IGNORED, seq=done.seq, step=done.name, attempt=earlier,
                           data={"signal_id": mid, "reason": "it came after its attempt timed "
                                 "out"})  # fmt: skip


async def run_step(run: SagaRun, command: Remote, done: Done, policy: RetryPolicy) -> Any:
    """Run a remote step to its outcome: its result, or StepFailed."""
    attempt = run.resume_attempts.pop(done.seq, 1)
    started: dict[str, Any] | None = run.started_data.pop(done.seq, None)
    extra = run.step_data(done)
    while True:
        mid = command_id(run.saga_id, done.name, attempt)
        if started is None or started.get("message_id") != mid:
            run.check_deadline(done.name)
            ends = None if done.timeout is None else run.latest_now() + done.timeout
            env = _command(run, command, done, attempt, compensation=False)
            started = {**extra, "topic": command.command, "message_id": mid, "ends": ends}
            await run.write(Kind.STEP_STARTED, seq=done.seq, step=done.name, attempt=attempt,
                            payload=env.to_json(), data=started)  # fmt: skip
            run.on_command()
        await _ignore_late(run, done, attempt, compensation=False)
        outcome = await _outcome(run, command=command, done=done, mid=mid,
                                 ends=started.get("ends"), attempt=attempt,
                                 policy=policy)  # fmt: skip
        if outcome is None:
            raise Suspend(started.get("ends") or WAIT_FOREVER,
                          signals={REPLY_SIGNAL + mid: 0}, effects=True)  # fmt: skip
        ok, value = outcome
        if ok:
            run.write_soon(Kind.STEP_COMPLETED, seq=done.seq, step=done.name, attempt=attempt,
                           payload=value, data=extra or None)  # fmt: skip
            return run.completed(done, decode(value))
        exc: Exception = value
        if policy.should_retry(exc, attempt):
            delay = policy.delay(attempt)
            await run.write(Kind.STEP_RETRYING, seq=done.seq, step=done.name, attempt=attempt,
                            error=error_info(exc), data={"retry_in": delay})  # fmt: skip
            await run.clock.sleep(delay)
            attempt, started = attempt + 1, None
            continue
        uncertain = isinstance(exc, StepTimedOut)
        err = error_info(exc)
        data = {**extra, "uncertain": True} if uncertain else (extra or None)
        await run.write(Kind.STEP_FAILED, seq=done.seq, step=done.name, attempt=attempt,
                        error=err, data=data)  # fmt: skip
        if uncertain:
            run.done_steps[done.seq] = done  # it may have acted: compensate it
        raise StepFailed(run.saga_id, done.name, attempt, err) from exc


async def _outcome(
    run: SagaRun,
    *,
    command: Remote,
    done: Done,
    mid: str,
    ends: Any,
    attempt: int,
    policy: RetryPolicy,
) -> tuple[bool, Any] | None:
    """(True, result payload), (False, the error), or None while the reply is awaited."""
    found = await _reply(run, mid)
    if found is not None:
        kind, payload = found
        run.signal_ids.add(mid)
        if kind == COMPLETED:
            return True, payload
        error = decode(payload) or {}
        failed = RemoteStepFailed(command.command, str(error.get("type", "Exception")),
                                  str(error.get("message", "")))  # fmt: skip
        return False, failed
    if ends is not None and run.earliest_now() >= ends:
        timeout = done.timeout or 0.0
        return False, StepTimedOut(run.saga_id, done.name, after=timeout, attempt=attempt,
                                   of=policy.max_attempts)  # fmt: skip
    return None


async def compensate(run: SagaRun, command: Remote, done: Done) -> Exception | None:
    """Run a remote compensation to its end: None, or the error it failed with for good."""
    policy = done.policy
    attempt = max(run.compensation_attempts.get(done.seq, 1), 1)
    started = run.compensation_started.get(done.seq)
    while True:
        mid = command_id(run.saga_id, done.name, attempt, compensation=True)
        if started != mid:
            run.compensation_attempts[done.seq] = attempt
            ends = None if done.timeout is None else run.latest_now() + done.timeout
            env = _command(run, command, done, attempt, compensation=True)
            data = {"topic": command.command, "message_id": mid, "ends": ends}
            await run.write(Kind.COMPENSATION_STARTED, seq=done.seq, step=done.name,
                            attempt=attempt, payload=env.to_json(), data=data)  # fmt: skip
            run.compensation_ends[done.seq] = ends
            run.on_command()
            started = mid
        await _ignore_late(run, done, attempt, compensation=True)
        ends = run.compensation_ends.get(done.seq)
        outcome = await _outcome(run, command=command, done=done, mid=mid, ends=ends,
                                 attempt=attempt, policy=policy)  # fmt: skip
        if outcome is None:
            raise Suspend(ends or WAIT_FOREVER, signals={REPLY_SIGNAL + mid: 0}, effects=True)
        ok, value = outcome
        if ok:
            await run.write(Kind.COMPENSATION_COMPLETED, seq=done.seq, step=done.name,
                            attempt=attempt)  # fmt: skip
            run.compensated.add(done.seq)
            return None
        if not policy.should_retry(value, attempt):
            return value  # type: ignore[no-any-return]
        delay = policy.delay(attempt)
        await run.write(Kind.COMPENSATION_RETRYING, seq=done.seq, step=done.name,
                        attempt=attempt, error=error_info(value),
                        data={"retry_in": delay})  # fmt: skip
        await run.clock.sleep(delay)
        attempt += 1
