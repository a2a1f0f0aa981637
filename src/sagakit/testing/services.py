"""Explore's broker: the services given to explore answer remote steps' commands in-process.

A remote step journals its command; the store's trigger copies it into the outbox; the saga
unloads until the reply is stored as its signal ``sagakit.reply.<command id>`` (see
:mod:`sagakit.remote_steps`). Explore has no broker and no relay: when a point's run unloads,
the driver gives the scratch store's outbox to :class:`Services`, which takes each command of
the saga, runs its service's handler the way :class:`~sagakit.service.Service` does (through
:func:`sagakit.handlers.handle`: a raised exception is a ``SagaStepFailed`` reply), stores the
reply the way the reply consumer does, and deletes the command from the outbox. The point's
faults strike here (see :class:`~sagakit.testing.faults.Effect`): a failed reply without
running the handler, a lost command, a lost reply, or the command handled twice.

Each handler runs in a transaction of its service's inbox database, as under the service,
when the service was made with ``inbox=URL``: writes through ``ctx.db`` commit with the inbox
row, and a handler that raises has them rolled back. Explore opens a connection of its own to
it (closed at the end) and leaves the service itself alone. A service on the default inbox
(``<name>-inbox.db`` in the working directory, which explore will not create) or explore's
``service_inboxes=False`` runs its handlers with ``ctx.db`` None and nothing stored.

A command handled twice (``dup@`` points) runs its handler twice even with an inbox, which
would answer a second delivery of the same message id from its row: the same step reaches the
handler again with the same ``ctx.idempotency_key`` and a new message id whenever an attempt
is re-sent after its timeout, and whenever the handler's effect lives outside the inbox's
transaction. The handler must not act twice, and must answer the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sagakit.codec import decode, encode
from sagakit.definition import Saga, StepKind, flatten
from sagakit.errors import ConfigurationError
from sagakit.handlers import Handler, handle
from sagakit.inbox import Inbox, InboxTx
from sagakit.journal import Entry, Kind
from sagakit.messaging.envelope import Envelope
from sagakit.remote import FAILED, REPLY_SIGNAL, Remote, reply
from sagakit.store.base import OutboxMessage, Store
from sagakit.testing.faults import CallRecord, Effect, InjectedFault, Probe
from sagakit.testing.timeskip import SkipClock

if TYPE_CHECKING:
    from sagakit.service import Service

_OUTBOX_BATCH = 10_000  # every waiting command: explore is the only relay of its store


@dataclass(frozen=True, slots=True, kw_only=True)
class _Route:
    """Where a command goes: its service's name, handler and inbox (None: no database)."""

    service: str
    handler: Handler
    inbox: Inbox | None


class _NoInbox:
    """The transaction of a handler run without a database: ``ctx.db`` is None, nothing is
    stored, and nothing can be rolled back."""

    db: Any = None

    async def claim(self, message_id: str) -> bool:
        return True

    async def record(self, message_id: str, reply_json: str) -> None:
        return None

    def savepoint(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()


def remote_commands(saga: Saga) -> list[str]:
    """The commands a declarative saga's remote steps and compensations send."""
    found = [
        fn.command
        for s in flatten(saga.steps)
        for fn in (s.action, s.compensate)
        if isinstance(fn, Remote)
    ]
    return list(dict.fromkeys(found))


class Services:
    """The handlers of the services given to explore, by command (``"Service.Command"``).

    Raises:
        ConfigurationError: two services handle the same command.
    """

    def __init__(self, services: Sequence[Service], *, inboxes: bool = True) -> None:
        self.executor: Executor | None = None  # for sync handlers, from open()
        self._routes: dict[str, _Route] = {}
        self._inboxes: list[Inbox] = []
        for service in services:
            inbox = None
            # The default inbox is a file in the working directory: a service not given
            # one keeps its handlers' state elsewhere, and explore creates no such file.
            if inboxes and service.inbox_given:
                inbox = Inbox(service.inbox.url, pool_size=2)
                self._inboxes.append(inbox)
            for command, handler in service.handlers.items():
                if command in self._routes:
                    raise ConfigurationError(
                        f"two services given to explore handle {command}: "
                        f"{self._routes[command].service} and {service.name}"
                    )
                self._routes[command] = _Route(service=service.name, handler=handler, inbox=inbox)

    @property
    def commands(self) -> frozenset[str]:
        return frozenset(self._routes)

    async def open(self, executor: Executor) -> None:
        """Connect to the inboxes (creating their table if missing); sync handlers will run
        in ``executor``."""
        self.executor = executor
        for inbox in self._inboxes:
            await inbox.open()

    async def close(self) -> None:
        for inbox in self._inboxes:
            await inbox.close()

    def check(self, saga: Saga) -> None:
        """Raise ConfigurationError if a declarative saga sends a command no service handles."""
        missing = [c for c in remote_commands(saga) if c not in self._routes]
        if missing:
            raise ConfigurationError(_unhandled(saga.name, missing[0], self.commands))

    async def deliver(
        self, store: Store, saga_id: str, journal: Sequence[Entry], probe: Probe, clock: SkipClock
    ) -> bool:
        """Hand the saga's commands in the outbox to their handlers, store the replies and
        delete the commands; return whether a reply was stored (the saga can go on).

        Raises:
            ConfigurationError: no service given to explore handles a command.
        """
        waiting = await store.outbox_claim(_OUTBOX_BATCH, 0.0)
        # Another saga's commands (a child's, or a stuck point's) are not this run's to take.
        mine = [m for m in waiting if m.saga_id == saga_id]
        replied = False
        for message in mine:
            replied |= await self._one(store, message, journal, probe, clock)
            await store.outbox_done([message.id])
        return replied

    async def _one(
        self,
        store: Store,
        message: OutboxMessage,
        journal: Sequence[Entry],
        probe: Probe,
        clock: SkipClock,
    ) -> bool:
        command = Envelope.from_json(message.message)
        route = self._routes.get(message.topic)
        if route is None:
            saga_type = command.headers.get("saga_type", "?")
            raise ConfigurationError(_unhandled(saga_type, message.topic, self.commands))
        step = command.headers.get("step", "")
        compensation = command.headers.get("compensation") == "1"
        attempt = int(command.headers.get("attempt", "1"))
        fault = probe.fault(step, compensation=compensation, attempt=attempt)
        effect = None if fault is None else fault.effect
        if fault is not None:
            probe.struck.append(fault)

        def record(*, injected: bool = False, duplicate: bool = False) -> None:
            probe.calls.append(
                CallRecord(tick=probe.tick(), step=step, compensation=compensation,
                           attempt=attempt, kind=_kind(journal, step), injected=injected,
                           life=probe.life, remote=True, duplicate=duplicate)
            )  # fmt: skip

        if effect in (Effect.ERROR, Effect.DROP):
            record(injected=True)
            if effect is Effect.DROP:
                return False
            error = InjectedFault(probe.point, step, attempt, compensation=compensation)
            answer = reply(
                command, ok=False, payload={"type": "InjectedFault", "message": str(error)}
            )
        else:
            record()
            answer = await self._handle(route, command, attempt, probe)
            if effect is Effect.DUPLICATE:
                record(duplicate=True)
                again = await self._handle(route, command, attempt, probe)
                probe.problems += _differs(command, step, compensation, answer, again)
            elif effect is Effect.LOSE_REPLY:
                return False
        stored = encode({"type": answer.type, "payload": answer.payload})
        name = REPLY_SIGNAL + command.message_id
        saga_id = command.correlation_id or message.saga_id
        return await store.send_signal(saga_id, answer.message_id, name, stored, clock.now())

    async def _handle(
        self, route: _Route, command: Envelope, attempt: int, probe: Probe
    ) -> Envelope:
        """Run the handler as the service would: the reply it sends."""
        data = decode(command.payload)
        kw: dict[str, Any] = {"service": route.service, "handler": route.handler, "data": data,
                              "attempt": attempt, "executor": self.executor}  # fmt: skip
        if route.inbox is None:
            answer = await handle(_NoInbox(), command, **kw)
            probe.problems += _used_db(command, answer)
            return answer
        tx: InboxTx
        async with route.inbox.transaction() as tx:
            claimed = await tx.claim(command.message_id)  # False for the second of a dup
            answer = await handle(tx, command, **kw)
            if claimed:
                await tx.record(command.message_id, answer.to_json())
        return answer


def _kind(journal: Sequence[Entry], step: str) -> StepKind:
    for e in reversed(journal):
        if e.kind is Kind.STEP_STARTED and e.step == step:
            return StepKind((e.data or {}).get("kind", StepKind.COMPENSATABLE))
    return StepKind.COMPENSATABLE


def _differs(
    command: Envelope, step: str, compensation: bool, first: Envelope, second: Envelope
) -> list[str]:
    """A handler that answered a second delivery differently is not idempotent."""
    a = (first.type, decode(first.payload))
    b = (second.type, decode(second.payload))
    if a == b:
        return []
    what = f"the compensation of {step!r}" if compensation else repr(step)
    return [
        f"{command.type} ({what}) answered its second delivery {_said(second)}, the first "
        f"{_said(first)}: its handler must be idempotent by ctx.idempotency_key"
    ]


def _said(answer: Envelope) -> str:
    text = answer.payload if len(answer.payload) <= 60 else answer.payload[:59] + "…"
    return f"{'failed' if answer.type == FAILED else 'ok'} {text}"


def _used_db(command: Envelope, answer: Envelope) -> list[str]:
    """A handler run without a database that failed on ``ctx.db`` being None: say why."""
    error = decode(answer.payload) if answer.type == FAILED else None
    if not isinstance(error, dict) or error.get("type") != "AttributeError":
        return []
    message = str(error.get("message", ""))
    if "'NoneType' object has no attribute" not in message:
        return []
    return [
        f"the handler of {command.type} failed with AttributeError: {message}; if it used "
        "ctx.db: explore gives handlers a database only for a service made with inbox=URL "
        "(and service_inboxes=True)"
    ]


def _unhandled(saga_type: str, command: str, known: frozenset[str]) -> str:
    service, _, name = command.rpartition(".")
    handled = ", ".join(sorted(known)) or "none"
    return (
        f"saga {saga_type!r} sends {command}, which no service given to explore handles "
        f"(they handle: {handled}); pass explore(..., services=[...]) a Service({service!r}) "
        f"with @handles({name!r})"
    )
