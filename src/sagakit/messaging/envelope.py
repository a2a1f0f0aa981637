"""The message envelope: what travels between services, as JSON (never pickle)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from sagakit.codec import decode, encode
from sagakit.errors import CorruptMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """One message.

    Attributes:
        message_id: unique per message; receivers deduplicate by it (the inbox).
        type: what it is: a command (``"InventoryService.ReserveItems"``), a reply
            (``"SagaStepCompleted"``, ``"SagaStepFailed"``) or an event (``"OrderCreated"``).
        correlation_id: the saga the message belongs to (its id).
        causation_id: the id of the message that caused this one (a reply names its command).
        timestamp: seconds since the epoch, when it was made.
        payload: the body as sagakit JSON text (:mod:`sagakit.codec`); see :attr:`data`.
        traceparent, tracestate: W3C trace context, carried unchanged.
        reply_to: the topic a reply goes to, for commands.
        headers: small string metadata (attempt, idempotency key, ...).
    """

    message_id: str
    type: str
    correlation_id: str | None = None
    causation_id: str | None = None
    timestamp: float
    payload: str = "null"
    traceparent: str | None = None
    tracestate: str | None = None
    reply_to: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        type: str,
        data: Any = None,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        reply_to: str | None = None,
        headers: dict[str, str] | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        message_id: str | None = None,
        timestamp: float | None = None,
    ) -> Envelope:
        """A new message with a fresh id; ``data`` is encoded with :func:`sagakit.codec.encode`
        (raises NotSerializable, before anything is sent)."""
        return cls(
            message_id=message_id or str(uuid.uuid4()),
            type=type,
            correlation_id=correlation_id,
            causation_id=causation_id,
            timestamp=time.time() if timestamp is None else timestamp,
            payload=encode(data, what=f"the payload of message {type!r}"),
            traceparent=traceparent,
            tracestate=tracestate,
            reply_to=reply_to,
            headers=dict(headers or {}),
        )

    def data(self, hint: Any = None) -> Any:
        """The decoded payload (rebuilt as ``hint``, a dataclass or pydantic type, if given)."""
        return decode(self.payload, hint)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def to_bytes(self) -> bytes:
        return self.to_json().encode()

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        """Parse an envelope; :class:`CorruptMessage` if it is not one."""
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptMessage(f"not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise CorruptMessage(f"an envelope is a JSON object, got {type(raw).__name__}")
        missing = {"message_id", "type", "timestamp"} - raw.keys()
        if missing:
            raise CorruptMessage(f"missing fields: {', '.join(sorted(missing))}")
        unknown = raw.keys() - set(cls.__dataclass_fields__)
        if unknown:
            raise CorruptMessage(f"unknown fields: {', '.join(sorted(unknown))}")
        for name in ("message_id", "type", "payload"):
            if name in raw and not isinstance(raw[name], str):
                raise CorruptMessage(f"{name} must be a string, got {raw[name]!r}")
        for name in ("correlation_id", "causation_id", "traceparent", "tracestate", "reply_to"):
            if raw.get(name) is not None and not isinstance(raw[name], str):
                raise CorruptMessage(f"{name} must be a string or null, got {raw[name]!r}")
        stamp = raw["timestamp"]
        if isinstance(stamp, bool) or not isinstance(stamp, int | float):
            raise CorruptMessage(f"timestamp must be seconds since the epoch, got {stamp!r}")
        headers = raw.get("headers") or {}
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise CorruptMessage("headers must be an object of strings")
        try:
            return cls(**{**raw, "headers": headers})
        except TypeError as exc:
            raise CorruptMessage(str(exc)) from exc
