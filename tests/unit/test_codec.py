"""The JSON codec: round trips, type hints, and the errors for what it cannot store."""

from __future__ import annotations

import ast
import enum
import inspect
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

import sagakit.codec
from sagakit.codec import convert, decode, encode, error_info
from sagakit.errors import CorruptPayload, NotSerializable, PayloadError


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass(frozen=True)
class Address:
    street: str
    city: str


@dataclass(frozen=True)
class Item:
    sku: str
    qty: int
    price: Decimal


@dataclass(frozen=True)
class Customer:
    name: str
    address: Address
    items: list[Item]
    by_sku: dict[str, Item]
    color: Color
    created: datetime
    id: uuid.UUID
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MaybeAddress:
    address: Address | None


class Line(BaseModel):
    sku: str
    qty: int
    price: Decimal


class PurchaseOrder(BaseModel):
    id: uuid.UUID
    at: datetime
    lines: list[Line]
    note: str | None = None


def roundtrip(value: Any, hint: Any = None) -> Any:
    return decode(encode(value), hint)


@pytest.mark.parametrize(
    "value",
    [
        {"a": 1, "b": [1, 2, {"c": None}], "d": {"e": "f"}},
        [1, "x", True, None, 1.5, [], {}],
        'héllo ✓ "quoted" \\ \n',
        "",
        0,
        -7,
        2**70,
        3.25,
        -0.0,
        1e300,
        True,
        False,
        None,
    ],
)
def test_plain_json_values_round_trip_with_their_types(value: Any) -> None:
    back = roundtrip(value)
    assert back == value
    assert type(back) is type(value)


def test_encoding_is_compact_and_keeps_unicode() -> None:
    assert encode({"a": 1, "b": [True, None]}) == '{"a":1,"b":[true,null]}'
    assert encode("ünïcode") == '"ünïcode"'


def test_naive_datetime_round_trips() -> None:
    value = datetime(2024, 2, 29, 13, 45, 7, 123456)
    back = roundtrip(value)
    assert back == value
    assert back.tzinfo is None
    assert type(back) is datetime


@pytest.mark.parametrize(
    "tz", [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
)
def test_aware_datetime_round_trips_with_its_offset(tz: timezone) -> None:
    value = datetime(2024, 12, 31, 23, 59, 59, 999999, tzinfo=tz)
    back = roundtrip(value)
    assert back == value
    assert back.utcoffset() == value.utcoffset()


def test_date_round_trips_as_a_date_not_a_datetime() -> None:
    back = roundtrip(date(1999, 1, 2))
    assert back == date(1999, 1, 2)
    assert type(back) is date


def test_uuid_round_trips() -> None:
    value = uuid.UUID("5f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f")
    back = roundtrip({"id": value})
    assert back == {"id": value}
    assert isinstance(back["id"], uuid.UUID)


@pytest.mark.parametrize(
    "text",
    ["10.10", "0.1", "-0.000001", "1E+3", "12345678901234567890.123456789", "0", "-0"],
)
def test_decimal_round_trips_exactly(text: str) -> None:
    back = roundtrip([Decimal(text)])[0]
    assert isinstance(back, Decimal)
    assert str(back) == text  # same digits and exponent, not a float approximation
    assert back == Decimal(text)


def test_decimal_amounts_keep_trailing_zeros() -> None:
    back = roundtrip({"amount": Decimal("10.10"), "fee": Decimal("0.20")})
    assert back == {"amount": Decimal("10.10"), "fee": Decimal("0.20")}
    assert str(back["amount"]) == "10.10"


@pytest.mark.parametrize("value", [b"", b"\x00\xff\x10binary", bytes(range(256))])
def test_bytes_round_trip(value: bytes) -> None:
    back = roundtrip(value)
    assert back == value
    assert type(back) is bytes


def test_enum_encodes_as_its_value_and_decodes_with_a_hint() -> None:
    assert encode(Color.RED) == '"red"'
    assert decode(encode(Color.RED)) == "red"
    assert roundtrip(Color.GREEN, Color) is Color.GREEN
    assert roundtrip(Priority.HIGH, Priority) is Priority.HIGH
    assert roundtrip([Color.RED, Color.GREEN], list[Color]) == [Color.RED, Color.GREEN]


def _customer() -> Customer:
    item = Item(sku="A-1", qty=2, price=Decimal("10.10"))
    return Customer(
        name="Ada",
        address=Address(street="1 Main St", city="Springfield"),
        items=[item, Item(sku="B-2", qty=1, price=Decimal("0.99"))],
        by_sku={"A-1": item},
        color=Color.GREEN,
        created=datetime(2024, 5, 1, 9, 30, tzinfo=UTC),
        id=uuid.UUID(int=12345),
        tags=["vip"],
    )


def test_nested_dataclass_is_rebuilt_from_its_hint() -> None:
    value = _customer()
    back = roundtrip(value, Customer)
    assert back == value
    assert isinstance(back.address, Address)
    assert all(isinstance(i, Item) for i in back.items)
    assert isinstance(back.by_sku["A-1"], Item)
    assert back.color is Color.GREEN


def test_dataclass_without_hint_decodes_to_plain_values() -> None:
    back = roundtrip(_customer())
    assert back["address"] == {"street": "1 Main St", "city": "Springfield"}
    assert back["items"][0] == {"sku": "A-1", "qty": 2, "price": Decimal("10.10")}
    assert back["color"] == "green"


def test_list_and_dict_hints_rebuild_their_dataclass_elements() -> None:
    items = [Item(sku="A", qty=1, price=Decimal("1.00")), Item(sku="B", qty=2, price=Decimal(3))]
    assert roundtrip(items, list[Item]) == items
    by_name = {"a": items[0], "b": items[1]}
    back = roundtrip(by_name, dict[str, Item])
    assert back == by_name
    assert all(isinstance(v, Item) for v in back.values())


def test_missing_optional_value_stays_none() -> None:
    assert decode("null", Customer) is None
    assert decode(None, Customer) is None
    assert decode(None) is None


def test_optional_dataclass_hint_is_rebuilt() -> None:
    value = MaybeAddress(address=Address(street="s", city="c"))
    assert roundtrip(value, MaybeAddress) == value


def test_pydantic_model_is_rebuilt_from_its_hint() -> None:
    order = PurchaseOrder(
        id=uuid.UUID(int=7),
        at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        lines=[Line(sku="A", qty=3, price=Decimal("10.10"))],
    )
    back = roundtrip(order, PurchaseOrder)
    assert back == order
    assert isinstance(back.lines[0], Line)
    assert back.lines[0].price == Decimal("10.10")
    assert str(back.lines[0].price) == "10.10"
    assert roundtrip([order], list[PurchaseOrder]) == [order]


def test_pydantic_model_without_hint_decodes_to_plain_values() -> None:
    back = roundtrip(Line(sku="A", qty=3, price=Decimal("1.5")))
    assert back == {"sku": "A", "qty": 3, "price": Decimal("1.5")}


def test_convert_leaves_values_alone_for_plain_hints() -> None:
    assert convert({"a": 1}, dict) == {"a": 1}
    assert convert([1, 2], list[int]) == [1, 2]
    assert convert("x", str) == "x"
    assert convert({"k": "red"}, dict[str, Color]) == {"k": Color.RED}


@pytest.mark.parametrize(
    ("value", "named"),
    [
        pytest.param({1, 2}, "set", id="set"),
        pytest.param({"nested": frozenset({1})}, "frozenset", id="nested-frozenset"),
        pytest.param(object(), "object", id="object"),
        pytest.param(lambda: 1, "function", id="lambda"),
        pytest.param(float("nan"), "not JSON compliant", id="nan"),
        pytest.param([float("inf")], "not JSON compliant", id="inf"),
        pytest.param(bytearray(b"x"), "bytearray", id="bytearray"),
        pytest.param({("a", "b"): 1}, "keys must be", id="tuple-key"),
    ],
)
def test_unsupported_values_raise_not_serializable_naming_what(value: Any, named: str) -> None:
    with pytest.raises(NotSerializable) as info:
        encode(value, what="the input of saga 'Order'")
    exc = info.value
    assert exc.what == "the input of saga 'Order'"
    assert named in exc.reason
    assert str(exc).startswith("the input of saga 'Order' cannot be stored as JSON: ")
    assert "dataclasses, pydantic models" in str(exc)  # says what would work
    assert isinstance(exc, PayloadError)
    assert isinstance(exc.__cause__, TypeError | ValueError)


def test_not_serializable_defaults_to_naming_the_payload() -> None:
    with pytest.raises(NotSerializable, match=r"^payload cannot be stored as JSON"):
        encode({1, 2})


def test_circular_value_is_not_serializable() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(NotSerializable, match="Circular reference"):
        encode(loop)


@pytest.mark.parametrize("text", ["not json", "{", "", "[1,", "{'single': 1}", "NaN-ish"])
def test_invalid_json_text_is_corrupt(text: str) -> None:
    with pytest.raises(CorruptPayload) as info:
        decode(text)
    assert str(info.value).startswith("stored payload is not valid sagakit JSON: ")
    assert info.value.reason


@pytest.mark.parametrize("tag", ["pickle", "object", "os.system", ""])
def test_unknown_tag_is_corrupt_and_nothing_is_imported(tag: str) -> None:
    text = json.dumps({"__sagakit__": tag, "v": "builtins.eval"})
    with pytest.raises(CorruptPayload, match="unknown tag") as info:
        decode(text)
    assert repr(tag) in info.value.reason


def test_tag_lookalikes_with_other_keys_are_plain_objects() -> None:
    text = '{"__sagakit__":"pickle","v":1,"w":2}'
    assert decode(text) == {"__sagakit__": "pickle", "v": 1, "w": 2}


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('{"__sagakit__":"datetime","v":"yesterday"}', id="datetime"),
        pytest.param('{"__sagakit__":"date","v":17}', id="date"),
        pytest.param('{"__sagakit__":"bytes","v":"abc"}', id="bytes"),
        pytest.param(
            '{"__sagakit__":"decimal","v":"ten"}',
            id="decimal",
        ),
        pytest.param(
            '{"__sagakit__":"uuid","v":123}',
            id="uuid",
        ),
    ],
)
def test_tagged_value_that_does_not_parse_is_corrupt(text: str) -> None:
    with pytest.raises(CorruptPayload):
        decode(text)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"__sagakit__": "nope", "v": 1}, id="unknown-tag"),
        pytest.param({"__sagakit__": "date", "v": "2020-01-01"}, id="becomes-a-date"),
    ],
)
def test_user_dict_shaped_like_a_tag_round_trips_or_is_refused(value: dict[str, Any]) -> None:
    try:
        text = encode(value)
    except NotSerializable:
        return  # refusing it before anything is written is also correct
    assert decode(text) == value


def test_error_info_describes_an_exception() -> None:
    assert error_info(ValueError("boom")) == {
        "type": "ValueError",
        "module": "builtins",
        "message": "boom",
    }


def test_error_info_uses_qualname_and_module_and_is_json() -> None:
    class PaymentDeclined(Exception):
        pass

    info = error_info(PaymentDeclined("card 4242 declined"))
    assert info["type"] == (
        "test_error_info_uses_qualname_and_module_and_is_json.<locals>.PaymentDeclined"
    )
    assert info["module"] == __name__
    assert info["message"] == "card 4242 declined"
    assert decode(encode(info)) == info


def test_error_info_of_a_sagakit_error() -> None:
    info = error_info(CorruptPayload("bad"))
    assert info["type"] == "CorruptPayload"
    assert info["module"] == "sagakit.errors"
    assert "bad" in info["message"]


FORBIDDEN = {"pickle", "marshal", "shelve", "dill", "importlib", "eval", "exec", "__import__"}


def test_codec_never_uses_pickle_or_evaluates_code() -> None:
    tree = ast.parse(inspect.getsource(sagakit.codec))
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            used |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            used.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
    assert "json" in used  # the walk sees the module's real imports
    assert not used & FORBIDDEN
    modules = {v.__name__ for v in vars(sagakit.codec).values() if inspect.ismodule(v)}
    assert not modules & FORBIDDEN
