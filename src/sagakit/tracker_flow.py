"""The rules of a tracked choreography, as functions of a saga's journal. Pure: no I/O.

A :class:`Flow` names the events of one choreographed saga type by their role, and turns an
event (or the passing of time) into the journal entries the tracker appends:

1. Any event of the flow with a correlation id the tracker has not seen starts a saga
   (``SAGA_STARTED``, with that event's payload as input); the event is recorded after it.
2. Every event is recorded once per message id as ``EVENT_RECORDED`` (step = its type; data:
   type, message id, causation id, publishing service; payload: its payload). An event
   moves a parked saga on again: a flow that was late but not dead resumes.
3. A ``completes`` event completes the saga (``SAGA_COMPLETED``, output = its payload).
4. A ``fails`` event starts compensating (``SAGA_COMPENSATING``): the compensations owed are
   ``compensations[e]`` for every forward event ``e`` seen whose compensation event has not
   been seen. Once none is owed the saga has failed (``SAGA_FAILED``), at once if none was.
   A forward event that comes in while compensating adds its compensation to those owed.
5. Completed and failed are final: a later event is recorded and changes nothing. So is a
   ``completes`` event while compensating (the flow failed; the event is kept as evidence).
6. A saga that is started, running or compensating and has had no journal entry for
   ``deadline`` seconds is parked in ``needs_attention`` (``SAGA_PARKED``); its error says
   which event came last and which was expected.

The phase (forward, compensating, completed, failed) is read from the transitions already in
the journal, never recomputed, so what a saga went through stays true if the flow is redefined.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagakit.errors import ConfigurationError
from sagakit.events import SERVICE_HEADER, check_event_type
from sagakit.journal import ACTIVE, Entry, Kind, SagaState, project
from sagakit.messaging import Envelope

log = logging.getLogger("sagakit.tracker")


class Phase(enum.Enum):
    FORWARD = SagaState.RUNNING
    COMPENSATING = SagaState.COMPENSATING
    COMPLETED = SagaState.COMPLETED
    FAILED = SagaState.FAILED


_PHASE_OF = {
    Kind.SAGA_COMPENSATING: Phase.COMPENSATING,
    Kind.SAGA_COMPLETED: Phase.COMPLETED,
    Kind.SAGA_FAILED: Phase.FAILED,
    Kind.OPERATOR_RESOLVED: Phase.FAILED,  # an operator settled a parked saga by hand
}


@dataclass(slots=True)
class View:
    """What a journal says about a tracked saga."""

    phase: Phase = Phase.FORWARD
    seen: list[str] = field(default_factory=list)  # event types, in the order recorded
    message_ids: set[str] = field(default_factory=set)
    last_event: dict[str, Any] | None = None  # the data of the last EVENT_RECORDED
    next_index: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Flow:
    """The events of one choreographed saga type, by role. Build it with :meth:`of`.

    Attributes:
        saga_type: the type of the sagas the tracker records.
        forward: the events that take the flow forward, in flow order (``starts`` first).
        completes: events that complete it.
        fails: events that make it fail (and compensate).
        compensations: forward event -> the event that reports it undone.
        events: other events to record, with no effect on the state.
    """

    saga_type: str
    forward: tuple[str, ...]
    completes: frozenset[str]
    fails: frozenset[str] = frozenset()
    compensations: Mapping[str, str] = field(default_factory=dict)
    events: frozenset[str] = frozenset()

    @classmethod
    def of(
        cls,
        saga_type: str,
        *,
        starts: str,
        completes: Iterable[str],
        steps: Sequence[str] = (),
        fails: Iterable[str] = (),
        compensations: Mapping[str, str] | None = None,
        events: Iterable[str] = (),
    ) -> Flow:
        """A checked flow; :class:`ConfigurationError` if an event has two roles, a
        compensation belongs to no forward event, or nothing completes the flow."""
        if not isinstance(saga_type, str) or not saga_type:
            raise ConfigurationError(f"saga_type must be a non-empty str, got {saga_type!r}")
        comps = dict(compensations or {})
        roles: dict[str, str] = {}
        named = [
            *((e, "starts") for e in [starts]),
            *((e, "steps") for e in steps),
            *((e, "completes") for e in completes),
            *((e, "fails") for e in fails),
            *((e, "compensations") for e in comps.values()),
            *((e, "events") for e in events),
        ]
        for event, role in named:
            check_event_type(event)
            if event in roles:
                raise ConfigurationError(
                    f"event {event!r} is in {roles[event]!r} and in {role!r}: give each "
                    "event one role in a tracked flow"
                )
            roles[event] = role
        forward = (starts, *steps)
        strays = sorted(set(comps) - set(forward))
        if strays:
            raise ConfigurationError(
                f"compensations are keyed by forward events (starts or steps); "
                f"{', '.join(strays)} is not one"
            )
        if not any(role == "completes" for role in roles.values()):
            raise ConfigurationError(f"flow {saga_type!r} needs at least one completes event")
        return cls(
            saga_type=saga_type,
            forward=forward,
            completes=frozenset(completes),
            fails=frozenset(fails),
            compensations=comps,
            events=frozenset(events),
        )

    @property
    def topics(self) -> tuple[str, ...]:
        """Every event of the flow, each once."""
        found = [*self.forward, *sorted(self.completes), *sorted(self.fails),
                 *self.compensations.values(), *sorted(self.events)]  # fmt: skip
        return tuple(dict.fromkeys(found))

    # -- reading a journal ---------------------------------------------------------------------

    def view(self, journal: Iterable[Entry]) -> View:
        v = View()
        for e in journal:
            v.next_index = e.index + 1
            if e.kind is Kind.EVENT_RECORDED:
                data = e.data or {}
                v.seen.append(str(data.get("event")))
                v.message_ids.add(str(data.get("message_id")))
                v.last_event = data
            elif e.kind in _PHASE_OF:
                v.phase = _PHASE_OF[e.kind]
        return v

    def owed(self, seen: Sequence[str]) -> list[tuple[str, str]]:
        """(compensation event, forward event it undoes) still owed, latest forward first."""
        done = set(seen)
        found = []
        for event in reversed(list(dict.fromkeys(e for e in seen if e in self.compensations))):
            undo = self.compensations[event]
            if undo not in done:
                found.append((undo, event))
        return found

    def _after(self, phase: Phase, event: str, seen: list[str]) -> Phase:
        if phase is Phase.FORWARD and event in self.completes:
            return Phase.COMPLETED
        if phase is Phase.FORWARD and event in self.fails:
            return Phase.COMPENSATING if self.owed(seen) else Phase.FAILED
        if phase is Phase.COMPENSATING and not self.owed(seen):
            return Phase.FAILED
        return phase

    # -- what to append ------------------------------------------------------------------------

    def record(self, event: Envelope, journal: Sequence[Entry], *, at: float) -> list[Entry]:
        """The entries that record ``event`` in a saga with ``journal``: none if its message
        id is recorded already."""
        v = self.view(journal)
        if event.message_id in v.message_ids:
            return []
        saga_id = journal[0].saga_id
        after = self._after(v.phase, event.type, [*v.seen, event.type])
        data = {
            "event": event.type,
            "message_id": event.message_id,
            "causation_id": event.causation_id,
            "service": event.headers.get(SERVICE_HEADER),
            "state": v.phase.value.value,  # an event leaves the state where it was
        }
        entries = [Entry(saga_id=saga_id, index=v.next_index, kind=Kind.EVENT_RECORDED, at=at,
                         step=event.type, payload=event.payload, data=data)]  # fmt: skip
        if after is not v.phase:
            entries.append(self._transition(v, after, event, saga_id, at))
        return entries

    def _transition(self, v: View, after: Phase, event: Envelope, saga_id: str, at: float) -> Entry:
        index = v.next_index + 1
        base: dict[str, Any] = {"saga_id": saga_id, "index": index, "at": at}
        if after is Phase.COMPLETED:
            return Entry(**base, kind=Kind.SAGA_COMPLETED, payload=event.payload,
                         data={"event": event.type})  # fmt: skip
        if after is Phase.FAILED and v.phase is Phase.COMPENSATING:
            return Entry(**base, kind=Kind.SAGA_FAILED, data={"event": event.type})
        error = {"type": event.type, "module": "choreography",
                 "message": f"{event.type} (message {event.message_id}"
                            f"{_from(event.headers.get(SERVICE_HEADER))})"}  # fmt: skip
        if after is Phase.FAILED:  # failed with nothing to compensate
            return Entry(**base, kind=Kind.SAGA_FAILED, error=error,
                         data={"event": event.type, "owed": []})  # fmt: skip
        owed = [undo for undo, _ in self.owed([*v.seen, event.type])]
        return Entry(**base, kind=Kind.SAGA_COMPENSATING, error=error,
                     data={"event": event.type, "owed": owed})  # fmt: skip

    def stall(self, journal: Sequence[Entry], *, now: float, deadline: float) -> list[Entry]:
        """A ``SAGA_PARKED`` entry if the saga is active and its last entry is at least
        ``deadline`` seconds old; else nothing."""
        if not journal or project(journal).state not in ACTIVE:
            return []
        quiet = now - journal[-1].at
        if quiet < deadline:
            return []
        v = self.view(journal)
        last = v.last_event
        after = f"after {last['event']}" if last else "after the saga started"
        if last and last.get("service"):
            after += f" (from {last['service']})"
        expected = self._expected(v)
        message = f"no event for {quiet:.1f} s {after}; expected {expected}"
        error = {"type": "FlowStalled", "module": "sagakit.tracker", "message": message}
        data = {"after": last["event"] if last else None, "expected": expected,
                "deadline": deadline}  # fmt: skip
        return [Entry(saga_id=journal[0].saga_id, index=v.next_index, kind=Kind.SAGA_PARKED,
                      at=now, error=error, data=data)]  # fmt: skip

    def _expected(self, v: View) -> str:
        if v.phase is Phase.COMPENSATING:
            owed = self.owed(v.seen)
            return ", ".join(f"{undo} (undoes {done})" for undo, done in owed) or "nothing"
        completion = f"a completion ({', '.join(sorted(self.completes))})"
        reached = [self.forward.index(e) for e in v.seen if e in self.forward]
        following = max(reached, default=-1) + 1
        if following < len(self.forward):
            return f"{self.forward[following]}, or {completion}"
        return completion


def _from(service: str | None) -> str:
    return f" from {service}" if service else ""
