"""sagakit: durable sagas. Steps with compensations, retries, timeouts and crash recovery.

Quick start::

    from sagakit import App, Saga, step

    app = App()  # state in ./sagakit.db
    app.register(Saga("Order", steps=[step("reserve", reserve, compensate=release)]))
    handle = await app.start("Order", {"order_id": "A1"}, idempotency_key="A1")
    print(await handle.result())
"""

from sagakit.app import App
from sagakit.definition import RetryPolicy, Saga, Step, step
from sagakit.errors import (
    AppClosed,
    ConfigurationError,
    CorruptPayload,
    DatabaseOwned,
    DefinitionError,
    DemoError,
    DuplicateSagaType,
    DuplicateStepName,
    FencedOut,
    InvalidInput,
    InvalidRetryPolicy,
    InvalidSagaState,
    InvalidStep,
    NonDeterminismError,
    NotSerializable,
    PayloadError,
    RecoveryLimitExceeded,
    SagaDeadlineExceeded,
    SagaFailed,
    SagakitError,
    SagaNotFound,
    SchemaTooNew,
    StepError,
    StepFailed,
    StepTimedOut,
    StoreError,
    StoreUnavailable,
    UnknownSagaType,
)
from sagakit.handle import SagaHandle, SagaInfo
from sagakit.journal import Entry, Kind, SagaState
from sagakit.sync import SyncApp
from sagakit.workflow import StepContext, WorkflowContext

__all__ = [
    "App",
    "AppClosed",
    "ConfigurationError",
    "CorruptPayload",
    "DatabaseOwned",
    "DefinitionError",
    "DemoError",
    "DuplicateSagaType",
    "DuplicateStepName",
    "Entry",
    "FencedOut",
    "InvalidInput",
    "InvalidRetryPolicy",
    "InvalidSagaState",
    "InvalidStep",
    "Kind",
    "NonDeterminismError",
    "NotSerializable",
    "PayloadError",
    "RecoveryLimitExceeded",
    "RetryPolicy",
    "Saga",
    "SagaDeadlineExceeded",
    "SagaFailed",
    "SagaHandle",
    "SagaInfo",
    "SagaNotFound",
    "SagaState",
    "SagakitError",
    "SchemaTooNew",
    "Step",
    "StepContext",
    "StepError",
    "StepFailed",
    "StepTimedOut",
    "StoreError",
    "StoreUnavailable",
    "SyncApp",
    "UnknownSagaType",
    "WorkflowContext",
    "step",
]
