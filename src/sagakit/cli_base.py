"""What every ``sagakit`` command shares: the ``--db`` and ``--json`` options, exit codes,
error reporting, loading an App, JSON output and progress bars.

Exit codes (also in ``sagakit --help``)::

    0  done
    1  the command ran and found a problem (``check``: a saga would break; ``demo``: an
       invariant was violated), or an error not listed below
    2  usage: a bad option, argument or input (e.g. a payload that is not JSON)
    3  not found: no such saga, saga type or database
    4  refused: the saga's state does not allow it (nothing was written)
    5  unavailable: the database or broker cannot be reached now; try again later
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import click
from click.shell_completion import CompletionItem
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sagakit.app import App
from sagakit.errors import (
    BrokerUnavailable,
    ConfigurationError,
    DatabaseOwned,
    InvalidSagaState,
    PayloadError,
    SagakitError,
    SagaNotFound,
    StoreUnavailable,
    UnknownSagaType,
)
from sagakit.store import DEFAULT_URL, SqliteStore

T = TypeVar("T")


class ExitCode(enum.IntEnum):
    """The exit codes of ``sagakit`` commands."""

    OK = 0
    FAILED = 1
    USAGE = 2
    NOT_FOUND = 3
    REFUSED = 4
    UNAVAILABLE = 5


EXIT_CODES_HELP = """\b
Exit codes: 0 done; 1 a problem was found (check, demo) or an unexpected error;
2 bad usage or input; 3 no such saga, type or database; 4 refused by the saga's
state (nothing written); 5 database or broker unreachable, try again later."""


def exit_code_of(exc: SagakitError) -> ExitCode:
    """The exit code for a command that ended with ``exc``."""
    if isinstance(exc, SagaNotFound | UnknownSagaType):
        return ExitCode.NOT_FOUND
    if isinstance(exc, InvalidSagaState):
        return ExitCode.REFUSED
    if isinstance(exc, StoreUnavailable | BrokerUnavailable | DatabaseOwned):
        return ExitCode.UNAVAILABLE
    if isinstance(exc, ConfigurationError | PayloadError):
        return ExitCode.USAGE
    return ExitCode.FAILED


db_option = click.option(
    "--db",
    "url",
    envvar="SAGAKIT_DATABASE_URL",
    default=DEFAULT_URL,
    show_default=True,
    metavar="URL",
    help="Database URL; the environment variable SAGAKIT_DATABASE_URL sets the default.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")


def fail(message: str, code: ExitCode = ExitCode.FAILED) -> NoReturn:
    """Print ``message`` on stderr and exit with ``code``."""
    Console(stderr=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
    )
    sys.exit(code)


def run(coro: Coroutine[Any, Any, T], *, cleanup: Callable[[], None] | None = None) -> T:
    """Run ``coro``; a sagakit error ends the command with its message and the exit code of
    its kind (after ``cleanup``, e.g. stopping a progress bar)."""
    try:
        return asyncio.run(coro)
    except SagakitError as exc:
        if cleanup is not None:
            cleanup()
        fail(str(exc), exit_code_of(exc))


def reader(url: str) -> App:
    """An App that only reads ``url``; exits with a message if the database does not exist."""
    app = App(url, worker=False)
    if isinstance(app.store, SqliteStore) and not os.path.exists(app.store.path):
        fail(
            f"no database at {app.store.path}; run `sagakit migrate --db {url}` to create one "
            "or `sagakit demo` to fill one",
            ExitCode.NOT_FOUND,
        )
    return app


def console() -> Console:
    """A console for stdout; piped output gets wide lines instead of truncated columns."""
    out = Console()
    return out if out.is_terminal else Console(width=200)


def _jsonable(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def dumps(value: Any, indent: int | None = 2) -> str:
    """JSON text for the CLI's ``--json`` output (Decimal, UUID and datetime as strings)."""
    return json.dumps(value, indent=indent, default=_jsonable, ensure_ascii=False)


@contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr while the block runs (drawn only on a terminal, so piped
    and ``--json`` output stays clean); yields a function that advances it by n."""
    bar = Progress(
        TextColumn(f"[bold]{escape(label)}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task(label, total=total)
    if not bar.console.is_terminal:
        yield lambda n: None
        return
    with bar:
        yield lambda n: bar.advance(task, n)


def load_app(target: str) -> App:
    """Import ``module:attribute`` and return it if it is an App, else a clear usage error."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(f"{target!r} is not MODULE:ATTRIBUTE (e.g. myproject.sagas:app)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current directory
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise click.BadParameter(
            f"cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise click.BadParameter(f"module {module_name!r} has no attribute {attr!r}") from None
    except SagakitError as exc:
        raise click.BadParameter(f"building {target} failed: {exc}") from exc
    if not isinstance(obj, App):
        raise click.BadParameter(f"{target} is a {type(obj).__name__}, not a sagakit.App")
    return obj


def exit_when_threads_end(grace: float) -> NoReturn:
    """Exit 0 once the non-daemon threads end, waiting at most ``grace`` seconds for them.

    Synchronous step bodies may still run in threads after a worker stopped: their sagas
    were stopped and their results will be discarded (the sagas resume from the journal, like
    after a crash), but the interpreter would wait for them without limit at exit."""
    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def saga_ids(
    state: str | None = None,
) -> Callable[[click.Context, click.Parameter, str], list[CompletionItem]]:
    """Shell completion for a SAGA_ID argument: ids of the newest sagas (in ``state`` if
    given) in the command's database that start with what was typed, each with its type and
    state. Completion never fails: an unreadable database completes nothing."""

    def complete(
        ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        url = ctx.params.get("url") or os.environ.get("SAGAKIT_DATABASE_URL") or DEFAULT_URL

        async def newest(app: App) -> list[CompletionItem]:
            async with app:
                infos = await app.list(state=state, limit=_COMPLETED_IDS)
            return [CompletionItem(i.id, help=f"{i.saga_type} {i.state.value}")
                    for i in infos if i.id.startswith(incomplete)]  # fmt: skip

        try:
            app = App(url, worker=False)
            if isinstance(app.store, SqliteStore) and not os.path.exists(app.store.path):
                return []
            return asyncio.run(asyncio.wait_for(newest(app), timeout=3))
        except Exception:
            return []

    return complete


_COMPLETED_IDS = 200  # the newest sagas offered by saga id completion
