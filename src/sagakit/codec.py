"""JSON encoding of payloads. No pickle: decoding never imports or executes code.

Plain JSON values pass through. Other supported values are written as tagged objects
``{"__sagakit__": tag, "v": value}``: datetime, date, UUID, Decimal, bytes. Dataclasses and
pydantic models are written as their fields; Enums as their value. Decoding gives back plain
values, or rebuilds dataclasses / pydantic models / Enums when a type hint is given (the hint
comes from the user's code, never from the stored text).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import types
import typing
import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sagakit.errors import CorruptPayload, NotSerializable

TAG = "__sagakit__"


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return {TAG: "datetime", "v": value.isoformat()}
    if isinstance(value, date):
        return {TAG: "date", "v": value.isoformat()}
    if isinstance(value, uuid.UUID):
        return {TAG: "uuid", "v": str(value)}
    if isinstance(value, Decimal):
        return {TAG: "decimal", "v": str(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return {TAG: "bytes", "v": base64.b64encode(value).decode("ascii")}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="python")
    raise TypeError(f"a value of type {type(value).__qualname__} is not supported")


_ENCODER = json.JSONEncoder(
    default=_default, ensure_ascii=False, allow_nan=False, separators=(",", ":")
)


_SURROGATE = "is not valid Unicode: it has an unpaired surrogate (\\ud800-\\udfff)"


def is_unicode(value: str) -> bool:
    """Whether ``value`` is valid Unicode: a JSON "\\ud800" escape decodes to an unpaired
    surrogate, which no database stores and no response can carry."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_problem(value: str) -> str | None:
    """Why a database cannot store ``value`` as text, or None if it can."""
    if "\x00" in value:
        return "contains the NUL character (\\u0000), which PostgreSQL cannot store"
    return None if is_unicode(value) else _SURROGATE


def encode(value: Any, *, what: str = "payload") -> str:
    """Encode ``value`` as JSON text, or raise :class:`NotSerializable` naming ``what``."""
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise NotSerializable(what, str(exc)) from exc
    if not is_unicode(text):  # a "\ud800" in a str survives json but no database stores it
        raise NotSerializable(what, f"a string {_SURROGATE}")
    if TAG in text:  # rare: only then look for user dicts that would read back as a tag
        _refuse_reserved_key(value, what)
    return text


def _refuse_reserved_key(value: Any, what: str) -> None:
    if isinstance(value, dict):
        if TAG in value:
            raise NotSerializable(what, f"the dict key {TAG!r} is reserved by sagakit")
        children: Any = value.values()
    elif isinstance(value, list | tuple):
        children = value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [getattr(value, f.name) for f in dataclasses.fields(value)]
    elif callable(getattr(value, "model_dump", None)):
        children = [value.model_dump(mode="python")]
    else:
        return
    for child in children:
        _refuse_reserved_key(child, what)


_DECODERS: dict[str, Any] = {
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "uuid": uuid.UUID,
    "decimal": Decimal,
    "bytes": base64.b64decode,
}


def _object_hook(obj: dict[str, Any]) -> Any:
    tag = obj.get(TAG)
    if tag is None or len(obj) != 2 or "v" not in obj:
        return obj
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise CorruptPayload(f"unknown tag {tag!r}")
    try:
        return decoder(obj["v"])
    except Exception as exc:
        raise CorruptPayload(f"bad {tag} value {obj['v']!r}: {exc}") from exc


def decode(text: str | None, hint: Any = None) -> Any:
    """Decode JSON text written by :func:`encode`; rebuild ``hint`` types if given."""
    if text is None:
        return None
    try:
        value = json.loads(text, object_hook=_object_hook)
    except (ValueError, TypeError) as exc:
        raise CorruptPayload(str(exc)) from exc
    if hint is None or hint is Any:
        return value
    try:
        return convert(value, hint)
    except Exception as exc:  # pydantic's ValidationError, a dataclass's TypeError, ...
        raise CorruptPayload(f"stored value does not fit {hint!r}: {exc}") from exc


def convert(value: Any, hint: Any) -> Any:
    """Rebuild dataclasses, pydantic models and Enums named by ``hint`` from plain values."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin is not None:
        args = typing.get_args(hint)
        if origin is typing.Union or origin is types.UnionType:
            options = [a for a in args if a is not type(None)]
            return convert(value, options[0]) if len(options) == 1 else value
        if origin is list and args and isinstance(value, list):
            return [convert(v, args[0]) for v in value]
        if origin is dict and len(args) == 2 and isinstance(value, dict):
            return {k: convert(v, args[1]) for k, v in value.items()}
        return value
    if not isinstance(hint, type):
        return value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        hints = typing.get_type_hints(hint)
        kwargs = {
            f.name: convert(value[f.name], hints.get(f.name))
            for f in dataclasses.fields(hint)
            if f.name in value
        }
        return hint(**kwargs)
    validate = getattr(hint, "model_validate", None)
    if callable(validate) and isinstance(value, dict):
        return validate(value)
    if issubclass(hint, enum.Enum) and not isinstance(value, hint):
        return hint(value)
    return value


def error_info(exc: BaseException) -> dict[str, Any]:
    """The JSON description of an exception that the journal stores."""
    return {
        "type": type(exc).__qualname__,
        "module": type(exc).__module__,
        "message": str(exc),
    }
