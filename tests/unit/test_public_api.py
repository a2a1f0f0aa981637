"""The public API is curated: this list changes only on purpose."""

from __future__ import annotations

import importlib

import sagakit

PUBLIC_API = [
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


def test_public_api_is_pinned() -> None:
    assert sagakit.__all__ == PUBLIC_API
    assert sorted(PUBLIC_API) == PUBLIC_API
    assert len(set(PUBLIC_API)) == len(PUBLIC_API)


def test_every_public_name_is_importable() -> None:
    module = importlib.import_module("sagakit")
    for name in PUBLIC_API:
        assert getattr(module, name, None) is not None, name


def test_star_import_gives_exactly_the_public_api() -> None:
    namespace: dict[str, object] = {}
    exec("from sagakit import *", namespace)  # noqa: S102 - a fixed string, to test __all__
    assert sorted(k for k in namespace if k != "__builtins__") == PUBLIC_API
