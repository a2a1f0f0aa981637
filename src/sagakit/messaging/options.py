"""Options, names and backoff shared by the broker adapters.

Every adapter takes the same options, as keywords or in the URL query, and accepts the same
topic and group names, which each maps to its broker's naming rules.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sagakit.errors import ConfigurationError

# A topic is dot-separated words (``InventoryService.ReserveItems``); a group or a prefix is
# one word, so ``<prefix>.<group>.<topic>`` names stay unambiguous on every broker.
_WORD = r"[A-Za-z0-9_-]+"
TOPIC_RE = re.compile(rf"{_WORD}(\.{_WORD})*")
WORD_RE = re.compile(_WORD)
MAX_NAME = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerOptions:
    """Options every adapter takes, as keywords or in the URL query (``?prefix=t1&ack_wait=5``).

    Attributes:
        prefix: namespace of every exchange, queue, stream, subject and key the adapter makes.
        ack_wait: seconds a delivered message may stay unacked before it is delivered again.
        prefetch: messages a subscription may hold unacked at once (RabbitMQ ``prefetch_count``,
            the JetStream fetch batch, the ``XREADGROUP`` count).
        timeout: seconds to wait for a connection or for the broker to accept a message.
    """

    prefix: str = "sagakit"
    ack_wait: float = 30.0
    prefetch: int = 32
    timeout: float = 10.0


_CONVERT: dict[str, Callable[[str], Any]] = {
    "prefix": str,
    "ack_wait": float,
    "prefetch": int,
    "timeout": float,
}


def split_options(url: str, **given: Any) -> tuple[str, BrokerOptions]:
    """The URL without sagakit's query options, and the options (keywords and URL combined).

    An option given both ways with different values is a :class:`ConfigurationError`.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    values: dict[str, Any] = {}
    for name, text in query:
        if name in _CONVERT:
            try:
                values[name] = _CONVERT[name](text)
            except ValueError as exc:
                raise ConfigurationError(f"broker option {name}={text!r} is invalid") from exc
    for name, value in given.items():
        if value is None:
            continue
        if name in values and values[name] != value:
            raise ConfigurationError(
                f"broker option {name!r} is given as {value!r} and in the URL as "
                f"{values[name]!r}; give it once"
            )
        values[name] = value
    options = BrokerOptions(**values)
    check_word("prefix", options.prefix)
    if not options.ack_wait > 0 or not options.timeout > 0 or options.prefetch < 1:
        raise ConfigurationError(
            f"broker options need ack_wait > 0, timeout > 0 and prefetch >= 1, got {options}"
        )
    rest = urlencode([(k, v) for k, v in query if k not in _CONVERT])
    return urlunsplit(parts._replace(query=rest)), options


def redact(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def check_topic(topic: str) -> None:
    if len(topic) > MAX_NAME or not TOPIC_RE.fullmatch(topic):
        raise ConfigurationError(
            f"invalid topic {topic!r}: use words of letters, digits, '_' and '-' joined by "
            f"single dots, at most {MAX_NAME} characters (e.g. 'InventoryService.ReserveItems')"
        )


def check_word(what: str, name: str) -> None:
    if len(name) > MAX_NAME or not WORD_RE.fullmatch(name):
        raise ConfigurationError(
            f"invalid {what} {name!r}: use letters, digits, '_' and '-' only (no dots), "
            f"at most {MAX_NAME} characters"
        )


class Backoff:
    """Exponential backoff with full jitter, for reconnect and retry loops."""

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first, self.cap, self.attempt = first, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2**self.attempt)
        self.attempt = min(self.attempt + 1, 30)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0
