"""The events of a choreography: what a handler gets (:class:`EventContext`), the rule for
event types, and how the events a handling published are kept with its inbox row.

An inbox row of the event bus holds ``{"events": [<envelope JSON>, ...]}``, plus ``"error"``
for an event whose handler was given up on; see :mod:`sagakit.choreography`.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sagakit.errors import ConfigurationError, CorruptMessage
from sagakit.messaging import Envelope

__all__ = ["SERVICE_HEADER", "EventContext", "check_event_type"]

log = logging.getLogger("sagakit.choreography")
_NAMESPACE = uuid.UUID("6f1d3c1e-4b7a-4f3e-9a51-2c8e0d9b7a42")
SERVICE_HEADER = "service"  # names the service that published an event
# An event's type is its topic: the brokers' topic rule (dotted words), checked here so that a
# bad name fails when a handler is registered or an event is made, before anything is sent.
_EVENT = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_MAX_EVENT = 200


def check_event_type(event_type: str) -> None:
    """Raise :class:`ConfigurationError` unless ``event_type`` can be an event's type."""
    if (
        not isinstance(event_type, str)
        or len(event_type) > _MAX_EVENT
        or not _EVENT.match(event_type)
    ):
        raise ConfigurationError(
            f"invalid event type {event_type!r}: use words of letters, digits, '_' and '-' "
            f"joined by single dots, at most {_MAX_EVENT} characters (e.g. 'InventoryReserved')"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EventContext:
    """What a handler knows about the event it handles, and how it publishes events.

    Attributes:
        service: the name of the service handling the event.
        event: the event's type (``"InventoryReserved"``).
        message_id: the event's id; the same for every delivery of it.
        saga_id: the flow it belongs to (its ``correlation_id``), None if it has none.
        causation_id: the id of the message that caused it.
        headers: the envelope's headers (``headers["service"]`` names its publisher).
        db: the inbox transaction's connection (``sqlite3.Connection`` or
            ``asyncpg.Connection``): writes through it commit with the inbox row.
        envelope: the event as it arrived.
    """

    service: str
    event: str
    message_id: str
    saga_id: str | None
    causation_id: str | None
    headers: Mapping[str, str]
    db: Any
    envelope: Envelope
    _published: list[Envelope] = field(default_factory=list, repr=False)

    def publish(
        self,
        event_type: str,
        data: Any = None,
        *,
        correlation_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Envelope:
        """Publish an event caused by this one, once the handling commits.

        It carries this event's correlation id (pass ``correlation_id`` to start another
        flow) and names this event as its cause. It is stored with the inbox row and sent
        after commit, in the order of the calls; nothing is sent if the handler raises. Its
        message id derives from this event's id, the service and the call's position, so a
        re-run after a rollback publishes the same ids. Callable from sync handlers too.

        Raises:
            NotSerializable: ``data`` cannot be sent as JSON.
            ConfigurationError: ``event_type`` is no valid event type.
        """
        check_event_type(event_type)
        position = len(self._published)
        envelope = Envelope.new(
            event_type,
            data,
            correlation_id=correlation_id or self.saga_id,
            causation_id=self.message_id,
            message_id=str(uuid.uuid5(_NAMESPACE, f"{self.service}/{self.message_id}/{position}")),
            headers={**(headers or {}), SERVICE_HEADER: self.service},
            traceparent=self.envelope.traceparent,
            tracestate=self.envelope.tracestate,
        )
        self._published.append(envelope)
        return envelope

    @property
    def published(self) -> list[Envelope]:
        """The events published so far by this handling."""
        return list(self._published)


def inbox_record(events: list[Envelope], *, error: dict[str, Any] | None = None) -> str:
    """What the inbox row of a handled event holds: the events to send, and the error of a
    handler that was given up on."""
    record: dict[str, Any] = {"events": [e.to_json() for e in events]}
    if error is not None:
        record["error"] = error
    return json.dumps(record, separators=(",", ":"))


def recorded_events(event: Envelope, stored: str) -> list[Envelope]:
    """The events to send again for ``event``, read from its inbox row's ``stored`` text."""
    if not stored:
        return []
    try:
        return [Envelope.from_json(text) for text in json.loads(stored)["events"]]
    except (ValueError, KeyError, TypeError, CorruptMessage) as exc:
        # Another kind of inbox row (a Service's reply) under this id: nothing of ours to send.
        log.error("the inbox row of %s (message %s) is not an event bus record (%s); nothing "
                  "is sent again", event.type, event.message_id, exc)  # fmt: skip
        return []
