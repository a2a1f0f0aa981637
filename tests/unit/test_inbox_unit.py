"""The inbox's and the service's configuration checks: no I/O, nothing opened."""

from __future__ import annotations

from typing import Any

import pytest

from sagakit.errors import ConfigurationError
from sagakit.inbox import Inbox
from sagakit.service import HandlerContext, Service


class NoBroker:
    """A Broker that must never be used: these tests open nothing."""

    url = "none://"

    async def connect(self) -> None:
        raise AssertionError("connected")

    async def close(self) -> None: ...

    async def publish(self, topic: str, message: Any) -> None:
        raise AssertionError("published")

    async def declare(self, topic: str, group: str) -> None:
        raise AssertionError("declared")

    def subscribe(self, topic: str, group: str) -> Any:
        raise AssertionError("subscribed")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://host/db", "unsupported inbox URL"),
        ("sqlite://", "names no file"),
        ("postgresql://host/db?schema=bad;name", "letters, digits and underscores"),
    ],
)
def test_bad_inbox_urls(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        Inbox(url)


def test_inbox_locations_hide_credentials() -> None:
    assert Inbox("sqlite:///x/inbox.db").location == "sqlite:///x/inbox.db"
    assert Inbox("postgresql://u:secret@db.example/shop?schema=inv").location == (
        "postgresql://db.example/shop?schema=inv"
    )


def test_default_inbox_is_a_durable_file_named_after_the_service() -> None:
    service = Service("InventoryService", broker=NoBroker())
    assert service.inbox.url == "sqlite:///InventoryService-inbox.db"
    assert service.group == "InventoryService"


@pytest.mark.parametrize("name", ["", "Inventory.Service", "with space", None])
def test_bad_service_names(name: Any) -> None:
    with pytest.raises(ConfigurationError, match="service name"):
        Service(name, broker=NoBroker())


def test_bad_concurrency() -> None:
    with pytest.raises(ConfigurationError, match="concurrency"):
        Service("S", broker=NoBroker(), concurrency=0)


def test_handler_registration() -> None:
    service = Service("S", broker=NoBroker())

    @service.handles("ReserveItems")
    async def reserve(ctx: HandlerContext, data: Any) -> None: ...

    assert reserve.__name__ == "reserve"  # the decorator gives the function back
    with pytest.raises(ConfigurationError, match=r"S\.ReserveItems already has a handler"):
        service.handles("ReserveItems")
    with pytest.raises(ConfigurationError, match="command name"):
        service.handles("S.ReserveItems")


async def test_a_service_without_handlers_does_not_start() -> None:
    with pytest.raises(ConfigurationError, match="no handlers"):
        await Service("S", broker=NoBroker()).start()
