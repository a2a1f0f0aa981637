"""Child sagas: a saga started by another as one of its steps.

The parent journals the child's id before it creates the child (idempotently, keyed by the
parent and the step), then waits, unloaded, until the child ends; the child's output is the
step's result and its failure the step's failure. Compensating a completed child runs the
child's own compensation path: the parent reopens the child for compensation and waits until
it is compensated.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import TYPE_CHECKING, Any

from sagakit.codec import decode, encode
from sagakit.definition import DEFAULT_COMPENSATION_RETRY
from sagakit.engine import GROUP, Done, ReplayExhausted, Suspend
from sagakit.errors import InvalidSagaState, PayloadError, StepFailed, UnknownSagaType
from sagakit.journal import TERMINAL, Entry, Kind, SagaState
from sagakit.store.base import CANCEL_SIGNAL, SagaRecord, new_saga

if TYPE_CHECKING:
    from sagakit.engine import SagaRun

# A parent re-reads its child this often even if no wake-up came (a worker died between
# the child's end and the wake-up).
RECHECK = 60.0
_NAMESPACE = uuid.UUID("6f1d3c4e-4a55-4f0b-9d57-9a3c0b1f7e21")


def child_id(parent_id: str, step: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{parent_id}/{step}"))


async def child(run: SagaRun, saga_type: str, data: Any, name: str | None) -> Any:
    """Start (once) a child saga of ``saga_type`` and return its output when it completes;
    raise :class:`StepFailed` if it fails or is cancelled."""
    run.check_broken()
    seq, name = run.next(name or saga_type)
    if (problem := run.mismatch(seq, f"step {name!r}")) is not None:
        raise problem
    group = GROUP.get()
    done = Done(seq=seq, name=name, compensate=None, policy=DEFAULT_COMPENSATION_RETRY,
                timeout=None, data=data, group=group)  # fmt: skip
    rec = run.recorded.get(seq)
    if rec is not None:
        if rec.kind is Kind.STEP_FAILED:
            raise StepFailed(run.saga_id, name, 1, rec.error or {})
        done.child = (rec.data or {}).get("child")
        return run.completed(done, decode(rec.payload))
    if run.replay_only:
        raise ReplayExhausted
    extra: dict[str, Any] = {"child": child_id(run.saga_id, name), "type": saga_type}
    if group is not None:
        extra["group"] = group
    if seq not in run.in_flight:
        await run.cancel_point()
        record, first = _new_child(run, saga_type, data, extra["child"])
        await run.write(Kind.STEP_STARTED, seq=seq, step=name, attempt=1, data=extra)
        run.in_flight[seq] = name
        await run.store.create(record, first)
        run.notify()
    found = await run.store.get(extra["child"])
    if found is None:  # the parent died between journaling the child and creating it
        record, first = _new_child(run, saga_type, data, extra["child"])
        found, _ = await run.store.create(record, first)
        run.notify()
    return await _outcome(run, done, found, extra)


def _new_child(run: SagaRun, saga_type: str, data: Any, cid: str) -> tuple[SagaRecord, Entry]:
    saga = run.resolve(saga_type, None) if run.resolve is not None else None
    if saga is None:
        raise UnknownSagaType(saga_type, [])
    payload = encode(data, what=f"the input of child saga {saga_type!r}")
    if saga.input_type is not None:
        try:
            decode(payload, saga.input_type)
        except PayloadError as exc:
            raise exc from None
    return new_saga(saga, payload, now=run.clock.now(), saga_id=cid, parent_id=run.saga_id,
                    idempotency_key=f"sagakit-child:{cid}")  # fmt: skip


async def _outcome(run: SagaRun, done: Done, found: SagaRecord, extra: dict[str, Any]) -> Any:
    if found.state is SagaState.COMPLETED:
        run.write_soon(Kind.STEP_COMPLETED, seq=done.seq, step=done.name, attempt=1,
                       payload=found.output, data=extra)  # fmt: skip
        done.child = found.id
        return run.completed(done, decode(found.output))
    if found.state in TERMINAL:
        error = found.error or {"type": "ChildSaga", "message": f"child saga {found.state}"}
        await run.write(Kind.STEP_FAILED, seq=done.seq, step=done.name, attempt=1, error=error,
                        data=extra)  # fmt: skip
        raise StepFailed(run.saga_id, done.name, 1, error)
    if await run.take_cancel() is not None:  # pass the cancellation on, wait for its end
        await _send_cancel(run, found.id)
    raise Suspend(run.latest_now() + RECHECK, children=[found.id], effects=True)


async def _send_cancel(run: SagaRun, cid: str) -> None:
    reason = encode({"reason": f"parent saga {run.saga_id} is cancelled"})
    # InvalidSagaState: it ended meanwhile, and the next look at it records how.
    with contextlib.suppress(InvalidSagaState):
        await run.store.send_signal(cid, CANCEL_SIGNAL, CANCEL_SIGNAL, reason, run.clock.now())
    run.notify()


async def compensate_child(run: SagaRun, done: Done) -> Exception | None:
    """Compensate a completed child saga through its own compensation path."""
    assert done.child is not None
    if done.seq not in run.compensation_attempts:
        await run.write(Kind.COMPENSATION_STARTED, seq=done.seq, step=done.name, attempt=1,
                        data={"child": done.child})  # fmt: skip
        run.compensation_attempts[done.seq] = 1
    found = await run.store.get(done.child)
    if found is None:
        return LookupError(f"child saga {done.child} of {run.saga_id} is not in the store")
    if found.state is SagaState.COMPLETED:
        await _reopen(run, found.id)
    elif found.state in TERMINAL:
        await run.write(Kind.COMPENSATION_COMPLETED, seq=done.seq, step=done.name, attempt=1,
                        data={"child": done.child})  # fmt: skip
        run.compensated.add(done.seq)
        return None
    raise Suspend(run.latest_now() + RECHECK, children=[found.id], effects=True)


async def _reopen(run: SagaRun, cid: str) -> None:
    """Move a completed child to compensating (it compensates its steps and ends failed)."""
    why = {"type": "ParentCompensating", "message": f"parent saga {run.saga_id} compensates"}

    def decide(record: SagaRecord, journal: list[Entry]) -> list[Entry]:
        if record.state is not SagaState.COMPLETED:
            raise InvalidSagaState(record.id, record.state, "reopen", "completed")
        index = journal[-1].index + 1
        return [Entry(saga_id=cid, index=index, kind=Kind.SAGA_COMPENSATING,
                      at=run.clock.now(), error=why)]  # fmt: skip

    with contextlib.suppress(InvalidSagaState):  # reopened already (resumed after a crash)
        await run.store.append_checked(cid, decide)
    run.notify()
