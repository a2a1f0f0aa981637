"""A synchronous facade over App for callers that are not async (scripts, WSGI views)."""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from sagakit.app import App
from sagakit.definition import Saga
from sagakit.handle import SagaInfo

T = TypeVar("T")


class SyncSagaHandle:
    """The blocking twin of :class:`~sagakit.SagaHandle`."""

    def __init__(self, app: SyncApp, saga_id: str, created: bool) -> None:
        self.app, self.id, self.created = app, saga_id, created

    def status(self) -> SagaInfo:
        return self.app.get(self.id)

    def result(self, timeout: float | None = None) -> Any:
        return self.app._call(self.app.app.handle(self.id).result(timeout))


class SyncApp:
    """Runs an :class:`App` on a private event loop thread and blocks on each call.

    ``SyncApp(url, **app_options)`` takes the same arguments as App. Call ``close()`` (or use
    it as a context manager) when done.
    """

    def __init__(self, url: str | None = None, **options: Any) -> None:
        self.app = App(url, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sagakit-sync")
        self._thread.daemon = True
        self._thread.start()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def register(self, saga: Saga) -> Saga:
        return self.app.register(saga)

    def start(self, saga_type: str, data: Any = None, **options: Any) -> SyncSagaHandle:
        handle = self._call(self.app.start(saga_type, data, **options))
        return SyncSagaHandle(self, handle.id, handle.created)

    def get(self, saga_id: str) -> SagaInfo:
        return self._call(self.app.get(saga_id))

    def list(self, **filters: Any) -> builtins.list[SagaInfo]:
        return self._call(self.app.list(**filters))

    def retry(self, saga_id: str) -> SyncSagaHandle:
        handle = self._call(self.app.retry(saga_id))
        return SyncSagaHandle(self, handle.id, False)

    def resolve(self, saga_id: str, note: str) -> SagaInfo:
        return self._call(self.app.resolve(saga_id, note))

    def close(self) -> None:
        self._call(self.app.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
