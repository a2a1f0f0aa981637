"""Every exception sagakit raises, in one tree rooted at :class:`SagakitError`.

::

    SagakitError
    ├── ConfigurationError            bad App arguments, unsupported database URL
    │   └── DatabaseOwned             another process executes this SQLite file's sagas
    ├── DefinitionError               a saga definition is invalid (raised at registration)
    │   ├── DuplicateStepName
    │   ├── InvalidStep
    │   ├── InvalidRetryPolicy
    │   └── DuplicateSagaType
    ├── UnknownSagaType               start() of a type that was never registered
    ├── SagaNotFound                  get/retry/resolve of an id the store does not have
    ├── InvalidSagaState              retry/resolve/cancel/signal of a saga in the wrong state
    ├── AppClosed                     the App closed while a caller waited for a saga
    ├── PayloadError
    │   ├── NotSerializable           a value that cannot be stored as JSON
    │   ├── InvalidInput              an input that does not fit the workflow's declared type
    │   ├── CorruptPayload            stored text that is not valid sagakit JSON
    │   └── CorruptMessage            a received message that is not a sagakit envelope
    ├── StoreError                    the database failed; the driver's error is the cause
    │   ├── SchemaTooNew              the file was written by a newer sagakit
    │   ├── StoreUnavailable          the database cannot be reached now; try again later
    │   └── FencedOut                 this worker no longer owns the saga it tried to write
    ├── BrokerError                   the message broker failed; the driver's error is the cause
    │   └── BrokerUnavailable         the broker cannot be reached now; try again later
    ├── StepError                     raised inside a workflow by ``await ctx.step(...)``
    │   ├── StepFailed                the step failed for good (retries exhausted or not retryable)
    │   └── StepTimedOut              one attempt ran past its timeout
    ├── DemoError                     `sagakit demo` could not run (files in use, worker died)
    ├── SagaDeadlineExceeded          the saga's deadline passed before a step could start
    ├── NonDeterminismError           a replay called a different step than the journal recorded
    ├── RecoveryLimitExceeded         a saga was taken over from dead workers too often
    ├── SagaFailed                    SagaHandle.result() of a saga that did not complete
    ├── SagaCancelled                 raised inside a cancelled workflow where it would go on
    ├── SignalTimedOut                ctx.wait_for_signal() timed out
    └── PastPivot                     a saga failed after its point of no return
"""

from __future__ import annotations

from typing import Any


class SagakitError(Exception):
    """Root of every exception raised by sagakit."""


class ConfigurationError(SagakitError):
    """The App or a CLI command was configured wrongly."""


class DatabaseOwned(ConfigurationError):
    """Another process already executes the sagas of this SQLite database."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"another process holds the worker lock on {path}.lock and executes its sagas; "
            "stop it first, or open this App with worker=False to only start and read sagas"
        )


class DefinitionError(SagakitError):
    """A saga definition is invalid; nothing was registered."""


class DuplicateStepName(DefinitionError):
    def __init__(self, saga_type: str, step: str) -> None:
        self.saga_type, self.step = saga_type, step
        super().__init__(
            f"saga {saga_type!r} has two steps named {step!r}; step names must be unique "
            "because the journal and idempotency keys are keyed by them"
        )


class InvalidStep(DefinitionError):
    def __init__(self, saga_type: str, step: str, reason: str) -> None:
        self.saga_type, self.step, self.reason = saga_type, step, reason
        super().__init__(f"step {step!r} of saga {saga_type!r} is invalid: {reason}")


class InvalidRetryPolicy(DefinitionError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid RetryPolicy: {reason}")


class DuplicateSagaType(DefinitionError):
    def __init__(self, saga_type: str, version: int) -> None:
        self.saga_type, self.version = saga_type, version
        super().__init__(
            f"saga type {saga_type!r} version {version} is already registered; "
            "register each definition once, or bump its version"
        )


class UnknownSagaType(SagakitError):
    def __init__(self, saga_type: str, known: list[str]) -> None:
        self.saga_type, self.known = saga_type, known
        names = ", ".join(sorted(known)) or "none"
        super().__init__(
            f"no saga type {saga_type!r} is registered (registered: {names}); "
            "call app.register(...) or decorate it with @app.saga first"
        )


class SagaNotFound(SagakitError):
    def __init__(self, saga_id: str) -> None:
        self.saga_id = saga_id
        super().__init__(f"no saga with id {saga_id!r}; list them with `sagakit list`")


class InvalidSagaState(SagakitError):
    def __init__(self, saga_id: str, state: str, action: str, allowed: str) -> None:
        self.saga_id, self.state, self.action = saga_id, state, action
        super().__init__(
            f"cannot {action} saga {saga_id}: it is {state}; only a saga that is {allowed} can be"
        )


class AppClosed(SagakitError):
    def __init__(self, saga_id: str) -> None:
        self.saga_id = saga_id
        super().__init__(
            f"the App was closed while waiting for saga {saga_id}; the saga resumes from its "
            "journal when an App executes this database again"
        )


class PayloadError(SagakitError):
    """A payload could not be encoded to or decoded from JSON."""


class NotSerializable(PayloadError):
    def __init__(self, what: str, reason: str) -> None:
        self.what, self.reason = what, reason
        super().__init__(
            f"{what} cannot be stored as JSON: {reason}. Use dict/list/str/int/float/bool/None, "
            "dataclasses, pydantic models, datetime, date, UUID, Decimal or Enum"
        )


class InvalidInput(PayloadError):
    def __init__(self, saga_type: str, expected: object, reason: str) -> None:
        self.saga_type, self.expected, self.reason = saga_type, expected, reason
        super().__init__(
            f"the input of saga {saga_type!r} does not fit its workflow's type {expected!r}: "
            f"{reason}. Nothing was written"
        )


class CorruptPayload(PayloadError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"stored payload is not valid sagakit JSON: {reason}")


class CorruptMessage(PayloadError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"received message is not a sagakit envelope: {reason}")


class BrokerError(SagakitError):
    """The message broker failed; ``__cause__`` holds the driver's exception."""


class BrokerUnavailable(BrokerError):
    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, reason
        super().__init__(
            f"message broker {url} cannot be reached ({reason}); sagakit retries with backoff, "
            "and messages wait in the outbox until it is back"
        )


class StoreError(SagakitError):
    """The database failed; ``__cause__`` holds the driver's exception."""


class SchemaTooNew(StoreError):
    def __init__(self, location: str, found: int, supported: int) -> None:
        self.location, self.found, self.supported = location, found, supported
        super().__init__(
            f"database {location} has schema version {found}, but this sagakit supports up to "
            f"{supported}; upgrade sagakit (it was written by a newer release). Nothing was changed"
        )


class StoreUnavailable(StoreError):
    def __init__(self, location: str, reason: str) -> None:
        self.location, self.reason = location, reason
        super().__init__(
            f"database {location} cannot be reached ({reason}); sagakit retries with backoff, "
            "and sagas resume from their journal once it is back"
        )


class FencedOut(StoreError):
    def __init__(self, saga_id: str, worker: str) -> None:
        self.saga_id, self.worker = saga_id, worker
        super().__init__(
            f"worker {worker} no longer owns saga {saga_id} (its lease expired and another "
            "worker took the saga over); this worker drops the saga and wrote nothing"
        )


class StepError(SagakitError):
    """Base of the errors ``await ctx.step(...)`` raises inside a workflow."""


class StepFailed(StepError):
    """The step failed for good. ``error_type`` and ``message`` describe the last error.

    The same exception is raised live and on replay, so workflow code that catches it behaves
    identically after a recovery.
    """

    def __init__(self, saga_id: str, step: str, attempts: int, error: dict[str, Any]) -> None:
        self.saga_id, self.step, self.attempts = saga_id, step, attempts
        self.error = error
        self.error_type: str = str(error.get("type", "Exception"))
        self.message: str = str(error.get("message", ""))
        plural = "s" if attempts != 1 else ""
        super().__init__(
            f"step {step!r} of saga {saga_id} failed after {attempts} attempt{plural}: "
            f"{self.error_type}: {self.message}"
        )


class StepTimedOut(StepError):
    def __init__(self, saga_id: str, step: str, *, after: float, attempt: int, of: int) -> None:
        self.saga_id, self.step, self.after, self.attempt, self.of = (
            saga_id,
            step,
            after,
            attempt,
            of,
        )
        then = "it will be retried" if attempt < of else "no attempts are left"
        super().__init__(
            f"step {step!r} of saga {saga_id} timed out after {after} s; {then} "
            f"(attempt {attempt} of {of})"
        )


class DemoError(SagakitError):
    """The demo could not run (its files are in use, or the worker died on its own)."""


class SagaDeadlineExceeded(SagakitError):
    def __init__(self, saga_id: str, step: str, deadline: float) -> None:
        self.saga_id, self.step, self.deadline = saga_id, step, deadline
        super().__init__(
            f"saga {saga_id} passed its deadline before step {step!r} could start; "
            "it will compensate the steps it completed"
        )


class NonDeterminismError(SagakitError):
    def __init__(self, saga_id: str, seq: int, expected: str, got: str) -> None:
        self.saga_id, self.seq, self.expected, self.got = saga_id, seq, expected, got
        super().__init__(
            f"saga {saga_id} replayed {got} at position {seq} but its journal recorded "
            f"{expected}; the workflow code changed under a running saga or is not deterministic. "
            "Deploy the code the saga started with, then `sagakit retry`, or resolve it by hand"
        )


class RecoveryLimitExceeded(SagakitError):
    def __init__(self, saga_id: str, recoveries: int) -> None:
        self.saga_id, self.recoveries = saga_id, recoveries
        super().__init__(
            f"saga {saga_id} was taken over from a worker that died {recoveries} times in a row "
            "without getting further; it may be what kills them. Inspect it with `sagakit show`, "
            "then `sagakit retry` or `sagakit resolve` it"
        )


class SagaFailed(SagakitError):
    """Raised by ``SagaHandle.result()`` when the saga ended without completing."""

    def __init__(self, saga_id: str, state: str, error: dict[str, Any] | None) -> None:
        self.saga_id, self.state, self.error = saga_id, state, error
        detail = f": {error.get('type')}: {error.get('message')}" if error else ""
        super().__init__(f"saga {saga_id} ended {state}{detail}")


class SagaCancelled(SagakitError):
    """Raised inside a workflow that was cancelled, where it would start something new; the
    saga then compensates its completed steps and ends ``cancelled``."""

    def __init__(self, saga_id: str, reason: str) -> None:
        self.saga_id, self.reason = saga_id, reason
        super().__init__(f"saga {saga_id} was cancelled: {reason or 'no reason given'}")


class SignalTimedOut(SagakitError):
    """``await ctx.wait_for_signal(name, timeout=...)`` saw no signal in time."""

    def __init__(self, saga_id: str, name: str, after: float | None) -> None:
        self.saga_id, self.name, self.after = saga_id, name, after
        super().__init__(
            f"saga {saga_id} waited {after} s for signal {name!r} and none came; catch "
            "SignalTimedOut in the workflow to go on, or let it compensate the saga"
        )


class PastPivot(SagakitError):
    """A saga failed after its pivot (or in a retriable step): it cannot be compensated."""

    def __init__(self, saga_id: str, pivot: str, cause: BaseException) -> None:
        self.saga_id, self.pivot = saga_id, pivot
        self.cause_type = type(cause).__name__
        super().__init__(
            f"saga {saga_id} failed after its point of no return {pivot!r} "
            f"({self.cause_type}: {cause}); steps past the pivot are retried, never "
            "compensated. Fix the cause, then `sagakit retry` it to go forward, or "
            "`sagakit resolve` it"
        )
