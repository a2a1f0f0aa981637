"""pytest fixtures for testing sagas; sagakit registers this plugin (``pytest11``) on install.

Fixtures:

- ``sagakit_clock``: a fresh :class:`~sagakit.clock.VirtualClock`; ``await
  sagakit_clock.advance(timedelta(days=3))`` fires the timers due in those days at once.
- ``sagakit_db_url``: a ``sqlite:///`` URL of a file in the test's ``tmp_path``.
- ``sagakit_app``: an :class:`~sagakit.App` on that database with that clock, executing sagas
  in the test's event loop, closed after the test. Register your definitions on it first
  (``sagakit_app.register(saga)`` or ``@sagakit_app.saga("Name")``), then start sagas.
  An async fixture: it needs pytest-asyncio.
- ``sagakit_explore``: :func:`sagakit.testing.explore` that runs only the failure points named
  by ``--sagakit-point`` when given, so a failing point is re-run alone without editing code::

      pytest tests/test_orders.py --sagakit-point crash@7
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pytest

if TYPE_CHECKING:
    from sagakit.app import App
    from sagakit.clock import VirtualClock
    from sagakit.testing.report import ExploreReport

Explore = Callable[..., Awaitable["ExploreReport"]]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sagakit")
    group.addoption(
        "--sagakit-point",
        action="append",
        default=[],
        metavar="ID",
        help="run only this failure point (e.g. crash@7) where tests explore through the "
        "sagakit_explore fixture; repeat for several",
    )


@pytest.fixture
def sagakit_clock() -> VirtualClock:
    """A virtual clock that stands still until the test advances it."""
    from sagakit.clock import VirtualClock  # imported here: pytest loads plugins at startup

    return VirtualClock()


@pytest.fixture
def sagakit_db_url(tmp_path: Path) -> str:
    """A SQLite database URL in the test's temporary directory."""
    return f"sqlite:///{tmp_path / 'sagakit.db'}"


@pytest.fixture
def sagakit_explore(request: pytest.FixtureRequest) -> Explore:
    """``await sagakit_explore(app, "Type", data, invariant=...)``: explore, limited to the
    points given with ``--sagakit-point`` if any."""
    from sagakit.testing.explore import explore

    chosen: list[str] = request.config.getoption("--sagakit-point")

    async def run(app: App, saga_type: str, data: Any = None, **options: Any) -> ExploreReport:
        if chosen and "only" not in options:
            options["only"] = chosen
        return await explore(app, saga_type, data, **options)

    return run


_F = TypeVar("_F", bound=Callable[..., Any])


def _async_fixture(fn: _F) -> _F:
    """pytest-asyncio's fixture decorator (it runs async fixtures in strict mode too), or
    pytest's own without it: pytest then says that no plugin runs async fixtures. Imported
    here, not at the top: sagakit's plugin loads in every pytest run, with or without it."""
    try:
        import pytest_asyncio
    except ImportError:  # pragma: no cover - pytest-asyncio is in sagakit's dev extras
        return cast("_F", pytest.fixture(fn))
    return cast("_F", pytest_asyncio.fixture(fn))


@_async_fixture
async def sagakit_app(sagakit_db_url: str, sagakit_clock: VirtualClock) -> AsyncIterator[App]:
    """An App on ``sagakit_db_url`` with ``sagakit_clock``; register definitions on it."""
    from sagakit.app import App

    app = App(sagakit_db_url, clock=sagakit_clock, poll_interval=0.05)
    try:
        yield app
    finally:
        await app.close()
