"""Messaging: one Broker protocol, adapters for RabbitMQ, NATS JetStream, Redis Streams and an
in-memory broker for unit tests, chosen by URL; the envelope every message travels in."""

from __future__ import annotations

from urllib.parse import urlparse

from sagakit.errors import ConfigurationError
from sagakit.messaging.base import Broker, Delivery
from sagakit.messaging.envelope import Envelope

__all__ = ["Broker", "Delivery", "Envelope", "open_broker"]


def open_broker(url: str) -> Broker:
    """The broker a URL names: ``memory://name`` (in-process, for tests),
    ``amqp://user:pass@host:5672/vhost`` (RabbitMQ), ``nats://host:4222`` (NATS JetStream),
    ``redis://host:6379/0`` (Redis Streams). Drivers are optional extras, imported here."""
    scheme = urlparse(url).scheme
    if scheme == "memory":
        from sagakit.messaging.memory import MemoryBroker

        return MemoryBroker(url)
    if scheme in ("amqp", "amqps"):
        from sagakit.messaging.rabbitmq import RabbitBroker

        return RabbitBroker(url)
    if scheme in ("nats", "tls"):
        from sagakit.messaging.nats import NatsBroker

        return NatsBroker(url)
    if scheme in ("redis", "rediss"):
        from sagakit.messaging.redis import RedisBroker

        return RedisBroker(url)
    raise ConfigurationError(
        f"unsupported broker URL {url!r}: use memory://name, amqp://host, nats://host:4222 "
        "or redis://host:6379"
    )
