"""Remote steps: a step whose action (or compensation) is a command to another service.

The orchestrator publishes a command envelope; the service answers on the command's
``reply_to`` topic with ``SagaStepCompleted`` (the payload is the step's result) or
``SagaStepFailed`` (the payload is ``{"type": ..., "message": ...}``), naming the command in
``causation_id``. The command leaves through the transactional outbox: it is written with the
journal entry that starts the step and relayed to the broker after commit. The saga waits for
the reply unloaded; a reply is stored first (deduplicated by its message id) and then wakes it.

Usage::

    step("reserve_inventory", remote("InventoryService.ReserveItems"),
         compensate=remote("InventoryService.ReleaseReservation"), timeout=30)

    result = await ctx.call("InventoryService.ReserveItems", data, timeout=30,
                            compensate="InventoryService.ReleaseReservation")

A compensation command carries ``{"input": <the step's input>, "result": <its result>}``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from sagakit.errors import ConfigurationError, SagakitError
from sagakit.messaging.envelope import Envelope

COMPLETED = "SagaStepCompleted"
FAILED = "SagaStepFailed"
DEFAULT_REPLY_TOPIC = "sagakit.replies"
REPLY_SIGNAL = "sagakit.reply."  # + the command's message id: how a reply is stored
_NAME = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)+$")
_NAMESPACE = uuid.UUID("0b7e8f51-2a8a-4c51-9b8c-53e3f1c8f0d4")


@dataclass(frozen=True, slots=True)
class Remote:
    """A command to a service, standing in for a step's action or compensation."""

    command: str  # "Service.Command": also the topic it is published to

    def __post_init__(self) -> None:
        if not isinstance(self.command, str) or not _NAME.match(self.command):
            raise ConfigurationError(
                f"a remote command is named 'Service.Command' (letters, digits, '_', '-', "
                f"dotted), got {self.command!r}"
            )

    @property
    def __name__(self) -> str:  # steps are named after their action by default
        return self.command.rsplit(".", 1)[-1]

    def __call__(self, *args: Any) -> Any:
        raise TypeError(
            f"remote({self.command!r}) is run by the saga engine as a command to a service; "
            "it cannot be called directly"
        )


def remote(command: str) -> Remote:
    """A step action or compensation that is the command ``"Service.Command"``."""
    return Remote(command)


class RemoteStepFailed(SagakitError):
    """A service answered ``SagaStepFailed``: its handler raised ``error_type``."""

    def __init__(self, command: str, error_type: str, message: str) -> None:
        self.command, self.error_type, self.message = command, error_type, message
        super().__init__(f"{command} failed in its service: {error_type}: {message}")


def command_id(
    saga_id: str, step: str, attempt: int, *, compensation: bool = False, retry_round: int = 0
) -> str:
    """The message id of a command: the same for every send of one attempt (a re-run after a
    crash, a relay retry), so the service's inbox runs it once. ``retry_round`` counts the
    operator retries before the attempt: compensation attempts are numbered from 1 again
    after each, and each must still be a new command to the service."""
    what = "compensate" if compensation else "do"
    again = f"/r{retry_round}" if retry_round else ""
    return str(uuid.uuid5(_NAMESPACE, f"{saga_id}/{step}/{what}/{attempt}{again}"))


def reply(command: Envelope, *, ok: bool, payload: Any) -> Envelope:
    """The reply to ``command``: completed with ``payload`` (the result), or failed with
    ``payload`` = ``{"type": ..., "message": ...}``. Its id derives from the command's, so a
    re-sent reply is deduplicated by the orchestrator."""
    return Envelope.new(
        COMPLETED if ok else FAILED,
        payload,
        correlation_id=command.correlation_id,
        causation_id=command.message_id,
        message_id=str(uuid.uuid5(_NAMESPACE, f"reply/{command.message_id}")),
        traceparent=command.traceparent,
        tracestate=command.tracestate,
        headers={k: v for k, v in command.headers.items() if k in ("step", "attempt")},
    )
