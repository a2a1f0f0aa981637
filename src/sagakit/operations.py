"""The operator's actions on sagas, as App methods: signal, cancel, retry and resolve.

Each checks the saga's state in the same transaction that writes (``Store.append_checked``)
or stores the request first (signals and cancel requests), so that racing operators cannot
both act, and raises before anything is written when the action does not apply.
"""

from __future__ import annotations

import builtins
import time
import uuid
from typing import TYPE_CHECKING, Any

from sagakit.clock import Clock
from sagakit.codec import encode, text_problem
from sagakit.errors import ConfigurationError, InvalidSagaState
from sagakit.handle import SagaHandle, SagaInfo
from sagakit.journal import TERMINAL, Entry, Kind, SagaState
from sagakit.store.base import CANCEL_SIGNAL, SagaRecord, Store

if TYPE_CHECKING:
    from sagakit.worker import Runner


class Operations:
    """Mixed into :class:`sagakit.App`."""

    store: Store
    clock: Clock
    _runner: Runner | None

    # App implements these two; declared here so the methods below type-check.
    async def _ready(self) -> None:
        raise NotImplementedError

    async def _record(self, saga_id: str) -> SagaRecord:
        raise NotImplementedError

    async def retry(self, saga_id: str) -> SagaHandle:
        """Resume a saga in ``needs_attention``: its owed compensations, or its workflow if it
        was parked before compensating (after a fix was deployed)."""

        def decide(record: SagaRecord, journal: builtins.list[Entry]) -> builtins.list[Entry]:
            _require_attention(record, "retry")
            _refuse_tracked(record, journal, "retry")
            compensating = any(e.kind is Kind.SAGA_COMPENSATING for e in journal)
            resume = SagaState.COMPENSATING if compensating else SagaState.RUNNING
            return [_operator_entry(journal, Kind.OPERATOR_RETRY, {"resume": resume.value})]

        await self._ready()
        await self.store.append_checked(saga_id, decide)
        if self._runner is not None:
            self._runner.wake()  # it claims the saga, which the retry released
        return SagaHandle(self, saga_id)  # type: ignore[arg-type]

    async def resolve(self, saga_id: str, note: str) -> SagaInfo:
        """Record that an operator settled a ``needs_attention`` saga by hand; it ends failed
        with the note in its journal."""
        if not isinstance(note, str) or not note.strip():
            raise ConfigurationError(
                "resolve() needs a note (a non-empty str) saying what was done"
            )
        check_text(note, "the note")

        def decide(record: SagaRecord, journal: builtins.list[Entry]) -> builtins.list[Entry]:
            _require_attention(record, "resolve")
            return [_operator_entry(journal, Kind.OPERATOR_RESOLVED, {"note": note})]

        await self._ready()
        info = SagaInfo.of(await self.store.append_checked(saga_id, decide))
        if info.parent_id is not None:  # a parent waiting for this child learns of its end now
            await self.store.wake(info.parent_id)
            if self._runner is not None:
                self._runner.wake()
        return info

    async def signal(
        self, saga_id: str, name: str, payload: Any = None, *, signal_id: str | None = None
    ) -> bool:
        """Send signal ``name`` with ``payload`` to a saga. It is stored first, then delivered
        to the saga's ``ctx.wait_for_signal(name)`` (now, or whenever it waits for it); each
        signal is delivered once. Return False if a signal with ``signal_id`` was already
        sent to this saga (nothing is stored again).

        Raises:
            SagaNotFound: no saga has this id.
            InvalidSagaState: the saga is completed, failed or cancelled.
            NotSerializable: ``payload`` cannot be stored as JSON. Nothing is written.
        """
        if not isinstance(name, str) or not name or name.startswith("sagakit."):
            raise ConfigurationError(
                f"a signal name is a non-empty str not starting with 'sagakit.', got {name!r}"
            )
        if signal_id is not None and (not isinstance(signal_id, str) or not signal_id):
            raise ConfigurationError(f"signal_id must be a non-empty str, got {signal_id!r}")
        check_text(name, "the signal name")
        if signal_id is not None:
            check_text(signal_id, "signal_id")
        encoded = encode(payload, what=f"the payload of signal {name!r}")
        await self._ready()
        _refuse_tracked(await self._record(saga_id), await self.store.journal(saga_id), "signal")
        sent = await self.store.send_signal(
            saga_id, signal_id or str(uuid.uuid4()), name, encoded, self.clock.now()
        )
        if sent and self._runner is not None:
            self._runner.wake()
        return sent

    async def cancel(self, saga_id: str, *, reason: str = "") -> None:
        """Cancel a saga: at its next step or wait it stops going forward, compensates every
        step it completed (a step running now finishes first, and is compensated too) and
        ends ``cancelled``. A saga parked in ``needs_attention`` before compensating is
        cancelled the same way. Cancelling twice is harmless; a saga past its pivot step
        cannot be cancelled.

        Raises:
            SagaNotFound: no saga has this id.
            InvalidSagaState: the saga has ended, is compensating already, or is past its
                pivot. Nothing is written.
        """
        if not isinstance(reason, str):
            raise ConfigurationError(f"reason must be a str, got {reason!r}")
        check_text(reason, "the reason", empty=True)
        await self._ready()
        record = await self._record(saga_id)
        journal = await self.store.journal(saga_id)
        _check_cancellable(record, journal)
        if record.state is SagaState.NEEDS_ATTENTION:

            def decide(r: SagaRecord, j: builtins.list[Entry]) -> builtins.list[Entry]:
                _check_cancellable(r, j)
                data = {"reason": reason, "resume": SagaState.RUNNING.value}
                return [_operator_entry(j, Kind.CANCEL_REQUESTED, data)]

            await self.store.append_checked(saga_id, decide)
        else:
            payload = encode({"reason": reason})
            await self.store.send_signal(
                saga_id, CANCEL_SIGNAL, CANCEL_SIGNAL, payload, self.clock.now()
            )
        if self._runner is not None:
            self._runner.cancel(saga_id, reason)
            self._runner.wake()


def _refuse_tracked(record: SagaRecord, journal: list[Entry], action: str) -> None:
    """A choreographed saga (recorded by a Tracker) is not run by sagakit: refuse to act."""
    if journal and (journal[0].data or {}).get("tracked"):
        raise InvalidSagaState(
            record.id,
            f"{record.state} (choreographed: its services move it, not sagakit)",
            action,
            "orchestrated; publish the missing event, or `sagakit resolve` it",
        )


def _check_cancellable(record: SagaRecord, journal: list[Entry]) -> None:
    _refuse_tracked(record, journal, "cancel")
    kinds = {e.kind for e in journal}
    if record.state in TERMINAL or Kind.SAGA_COMPENSATING in kinds:
        raise InvalidSagaState(record.id, record.state, "cancel", "started, running, or "
                               "needs_attention before compensating")  # fmt: skip
    pivot = _pivot_passed(journal)
    if pivot is not None:
        raise InvalidSagaState(record.id, f"past its pivot step {pivot!r}", "cancel",
                               "before its pivot")  # fmt: skip


def _pivot_passed(journal: list[Entry]) -> str | None:
    """The pivot or retriable step a saga completed or started, from its journal."""
    for e in journal:
        kind = (e.data or {}).get("kind")
        if (e.kind is Kind.STEP_COMPLETED and kind == "pivot") or (
            e.kind is Kind.STEP_STARTED and kind == "retriable"
        ):
            return e.step
    return None


def _require_attention(record: SagaRecord, action: str) -> None:
    if record.state is not SagaState.NEEDS_ATTENTION:
        raise InvalidSagaState(record.id, record.state, action, "needs_attention")


def _operator_entry(journal: list[Entry], kind: Kind, data: dict[str, Any]) -> Entry:
    saga_id = journal[0].saga_id
    index = journal[-1].index + 1
    return Entry(saga_id=saga_id, index=index, kind=kind, at=time.time(), data=data)


def check_text(value: str, what: str, *, empty: bool = False) -> None:
    """Raise :class:`ConfigurationError` if ``value`` is not a str a database can store (or
    is empty, unless ``empty``)."""
    if not isinstance(value, str) or not (value or empty):
        raise ConfigurationError(f"{what} must be a non-empty str, got {value!r}")
    problem = text_problem(value)
    if problem is not None:
        raise ConfigurationError(f"{what} {problem}; nothing was written")
