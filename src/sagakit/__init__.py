"""sagakit: durable sagas. Steps with compensations, retries, timeouts and crash recovery.

Quick start::

    from sagakit import App, Saga, step

    app = App()  # state in ./sagakit.db
    app.register(Saga("Order", steps=[step("reserve", reserve, compensate=release)]))
    handle = await app.start("Order", {"order_id": "A1"}, idempotency_key="A1")
    print(await handle.result())
"""

from sagakit.app import App
from sagakit.clock import Clock, SystemClock, VirtualClock
from sagakit.definition import Parallel, RetryPolicy, Saga, Step, StepKind, parallel, step
from sagakit.errors import (
    AppClosed,
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    CorruptMessage,
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
    PastPivot,
    PayloadError,
    RecoveryLimitExceeded,
    SagaCancelled,
    SagaDeadlineExceeded,
    SagaFailed,
    SagakitError,
    SagaNotFound,
    SchemaTooNew,
    SignalTimedOut,
    StepError,
    StepFailed,
    StepTimedOut,
    StoreError,
    StoreUnavailable,
    UnknownSagaType,
)
from sagakit.handle import SagaHandle, SagaInfo
from sagakit.journal import Entry, Kind, SagaState
from sagakit.middleware import Middleware, RemoteDone, SagaCall, StepCall
from sagakit.remote import Remote, RemoteStepFailed, remote
from sagakit.service import HandlerContext, Service
from sagakit.sync import SyncApp
from sagakit.workflow import StepContext, WorkflowContext

__all__ = [
    "App",
    "AppClosed",
    "BrokerError",
    "BrokerUnavailable",
    "Clock",
    "ConfigurationError",
    "CorruptMessage",
    "CorruptPayload",
    "DatabaseOwned",
    "DefinitionError",
    "DemoError",
    "DuplicateSagaType",
    "DuplicateStepName",
    "Entry",
    "FencedOut",
    "HandlerContext",
    "InvalidInput",
    "InvalidRetryPolicy",
    "InvalidSagaState",
    "InvalidStep",
    "Kind",
    "Middleware",
    "NonDeterminismError",
    "NotSerializable",
    "Parallel",
    "PastPivot",
    "PayloadError",
    "RecoveryLimitExceeded",
    "Remote",
    "RemoteDone",
    "RemoteStepFailed",
    "RetryPolicy",
    "Saga",
    "SagaCall",
    "SagaCancelled",
    "SagaDeadlineExceeded",
    "SagaFailed",
    "SagaHandle",
    "SagaInfo",
    "SagaNotFound",
    "SagaState",
    "SagakitError",
    "SchemaTooNew",
    "Service",
    "SignalTimedOut",
    "Step",
    "StepCall",
    "StepContext",
    "StepError",
    "StepFailed",
    "StepKind",
    "StepTimedOut",
    "StoreError",
    "StoreUnavailable",
    "SyncApp",
    "SystemClock",
    "UnknownSagaType",
    "VirtualClock",
    "WorkflowContext",
    "parallel",
    "remote",
    "step",
]
