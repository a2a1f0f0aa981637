"""The message envelope: made, encoded and parsed as JSON; anything else is a CorruptMessage."""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from sagakit.errors import CorruptMessage, CorruptPayload, NotSerializable
from sagakit.messaging import Envelope


@dataclass(frozen=True)
class Reserve:
    sku: str
    qty: int
    price: Decimal


def full() -> Envelope:
    return Envelope.new(
        "InventoryService.ReserveItems",
        Reserve("A-1", 2, Decimal("9.99")),
        correlation_id="saga-1",
        causation_id="cmd-0",
        reply_to="sagakit.replies.orders",
        headers={"attempt": "2", "idempotency-key": "saga-1/reserve"},
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        tracestate="vendor=opaque",
    )


def valid(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(full().to_json())
    raw.update(changes)
    return raw


def test_new_fills_id_and_time_and_encodes_the_data() -> None:
    before = datetime.now(UTC).timestamp()
    envelope = full()
    assert uuid.UUID(envelope.message_id)
    assert before <= envelope.timestamp <= datetime.now(UTC).timestamp()
    assert envelope.type == "InventoryService.ReserveItems"
    assert envelope.data(Reserve) == Reserve("A-1", 2, Decimal("9.99"))
    assert envelope.data() == {"sku": "A-1", "qty": 2, "price": Decimal("9.99")}
    assert Envelope.new("T").data() is None
    assert Envelope.new("T").message_id != Envelope.new("T").message_id
    fixed = Envelope.new("T", message_id="m-1", timestamp=12.5)
    assert (fixed.message_id, fixed.timestamp) == ("m-1", 12.5)


def test_new_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(NotSerializable, match="the payload of message 'T'"):
        Envelope.new("T", {"when": object()})


def test_round_trip_keeps_every_field() -> None:
    envelope = full()
    assert Envelope.from_json(envelope.to_json()) == envelope
    assert Envelope.from_json(envelope.to_bytes()) == envelope
    assert envelope.to_bytes() == envelope.to_json().encode()
    unicode = Envelope.new("T", {"note": "naïve ✓ 漢字"}, headers={"k": "é"})
    assert Envelope.from_json(unicode.to_bytes()) == unicode
    assert set(json.loads(envelope.to_json())) == {f.name for f in dataclasses.fields(Envelope)}


def test_an_envelope_is_a_value() -> None:
    headers = {"attempt": "1"}
    envelope = Envelope.new("T", headers=headers)
    headers["attempt"] = "2"
    assert envelope.headers == {"attempt": "1"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        envelope.type = "U"  # type: ignore[misc]


def test_optional_fields_may_be_left_out() -> None:
    envelope = Envelope.from_json('{"message_id": "m", "type": "T", "timestamp": 1.0}')
    assert envelope == Envelope(message_id="m", type="T", timestamp=1.0)
    assert envelope.data() is None
    assert envelope.headers == {}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        ("{", "not JSON"),
        ("", "not JSON"),
        ('["a"]', "a JSON object, got list"),
        ("null", "a JSON object, got NoneType"),
        ('{"type": "T"}', "missing fields: message_id, timestamp"),
        (json.dumps(valid(extra=1)), "unknown fields: extra"),
        (json.dumps(valid(headers={"a": 1})), "headers must be an object of strings"),
        (json.dumps(valid(headers=["a"])), "headers must be an object of strings"),
    ],
)
def test_anything_else_is_a_corrupt_message(text: str | bytes, reason: str) -> None:
    with pytest.raises(CorruptMessage, match=reason) as caught:
        Envelope.from_json(text)
    assert reason in caught.value.reason


def test_a_payload_that_is_not_sagakit_json_fails_when_read() -> None:
    envelope = Envelope.from_json(json.dumps(valid(payload="{not json")))
    with pytest.raises(CorruptPayload):
        envelope.data()


@pytest.mark.parametrize(
    "changes",
    [{"message_id": 5}, {"timestamp": "yesterday"}, {"payload": 5}, {"type": None}],
)
def test_fields_of_the_wrong_type_are_corrupt(changes: dict[str, Any]) -> None:
    with pytest.raises(CorruptMessage):
        Envelope.from_json(json.dumps(valid(**changes)))
