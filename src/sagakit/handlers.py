"""Running one command's handler inside its inbox transaction, and what the handler sees.

The handler runs in a savepoint of the inbox transaction: its result becomes a
``SagaStepCompleted`` reply, and any exception it raises a ``SagaStepFailed`` reply with
``{"type": ..., "message": ...}`` whose savepoint is rolled back, so that a failed command
leaves none of its writes but is remembered (and answered the same way) like a completed one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from sagakit.calls import is_async
from sagakit.codec import convert
from sagakit.inbox import InboxTx
from sagakit.messaging import Envelope
from sagakit.observability.messages import Failed, handler_span
from sagakit.remote import reply

log = logging.getLogger("sagakit.service")


@dataclass(frozen=True, slots=True, kw_only=True)
class HandlerContext:
    """What a handler knows about the command it handles.

    Attributes:
        service: the service's name.
        command: the command's full type, ``"InventoryService.ReserveItems"``.
        message_id: the command's id; the same for every delivery of one attempt.
        saga_id: the saga that sent it (the envelope's ``correlation_id``).
        idempotency_key: ``"<saga id>/<step>"`` (``+"/compensate"`` for a compensation):
            the same for every attempt of the step; hand it to systems that deduplicate.
        attempt: the step's attempt number (1 for the first).
        step: the saga step the command stands for.
        compensation: True if the command undoes the step (its payload is
            ``{"input": ..., "result": ...}``).
        headers: all the envelope's headers.
        db: the inbox transaction's connection (``sqlite3.Connection`` or
            ``asyncpg.Connection``): writes through it commit with the inbox row.
    """

    service: str
    command: str
    message_id: str
    saga_id: str | None
    idempotency_key: str | None
    attempt: int
    step: str | None
    compensation: bool
    headers: Mapping[str, str] = field(default_factory=dict)
    db: Any = None


@dataclass(frozen=True, slots=True)
class Handler:
    """A registered handler: ``fn(ctx, data)``, ``data`` rebuilt as ``input_type``."""

    fn: Callable[..., Any]
    input_type: Any


def tags(command: Envelope) -> dict[str, Any]:
    """The fields every log line about ``command`` carries (``extra=`` of the record)."""
    return {
        "saga_id": command.correlation_id,
        "saga_type": command.headers.get("saga_type"),
        "step": command.headers.get("step"),
        "command": command.type,
        "message_id": command.message_id,
    }


def context(service: str, command: Envelope, attempt: int, db: Any) -> HandlerContext:
    return HandlerContext(
        service=service,
        command=command.type,
        message_id=command.message_id,
        saga_id=command.correlation_id,
        idempotency_key=command.headers.get("idempotency_key"),
        attempt=attempt,
        step=command.headers.get("step"),
        compensation=command.headers.get("compensation") == "1",
        headers=dict(command.headers),
        db=db,
    )


async def handle(
    tx: InboxTx,
    command: Envelope,
    *,
    service: str,
    handler: Handler | None,
    data: Any,
    attempt: int,
    executor: Executor | None,
    tracer_provider: Any = None,
) -> Envelope:
    """Run ``handler`` for ``command`` in ``tx`` (None: the service has no handler for its
    type), in a span continuing the command's trace; the reply to send. Only a failure of the
    transaction itself raises."""
    if handler is None:
        log.error("%s of saga %s: no handler for this command type in service %s",
                  command.type, command.correlation_id, service, extra=tags(command))  # fmt: skip
        message = f"service {service} has no handler for {command.type!r}"
        return reply(command, ok=False, payload={"type": "UnknownCommand", "message": message})
    ctx = context(service, command, attempt, tx.db)
    with handler_span(command, service, tracer_provider) as failed:
        return await _run(tx, command, handler, ctx, data=data, executor=executor, failed=failed)


async def _run(
    tx: InboxTx,
    command: Envelope,
    handler: Handler,
    ctx: HandlerContext,
    *,
    data: Any,
    executor: Executor | None,
    failed: Failed,
) -> Envelope:
    try:
        async with tx.savepoint():
            arg = data if handler.input_type is None else convert(data, handler.input_type)
            result = await call(handler.fn, ctx, arg, executor)
            # Encoded here: a result that cannot be sent undoes the handler's writes too.
            answer = reply(command, ok=True, payload=result)
    except Exception as exc:
        log.info("%s of saga %s failed: %s: %s", command.type, command.correlation_id,
                 type(exc).__name__, exc, extra=tags(command))  # fmt: skip
        failed(exc)
        error = {"type": type(exc).__name__, "message": str(exc)}
        return reply(command, ok=False, payload=error)
    log.info("%s of saga %s completed", command.type, command.correlation_id, extra=tags(command))
    return answer


async def call(
    fn: Callable[..., Any], ctx: HandlerContext, arg: Any, executor: Executor | None
) -> Any:
    """``fn(ctx, arg)``: awaited if async, else run in ``executor``."""
    if is_async(fn):
        return await fn(ctx, arg)
    loop = asyncio.get_running_loop()
    work: Awaitable[Any] = loop.run_in_executor(executor, functools.partial(fn, ctx, arg))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        # A thread cannot be stopped: let it finish with ctx.db before the transaction it
        # writes in is rolled back.
        await asyncio.wait([asyncio.ensure_future(work)])
        raise
