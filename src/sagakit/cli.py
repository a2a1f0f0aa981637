"""The ``sagakit`` command: ``demo``, ``worker``, ``list``, ``show``, ``signal``, ``cancel``,
``retry``, ``resolve``, ``check``, ``graph`` and ``migrate``.

Every command takes ``--db URL`` (default: ``$SAGAKIT_DATABASE_URL``, else
``sqlite:///sagakit.db``), except ``worker``, whose App names its own database. Commands that
only read open the database with ``App(url, worker=False)``, so they never execute sagas.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from datetime import datetime
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sagakit.app import App
from sagakit.cli_base import (
    EXIT_CODES_HELP,
    ExitCode,
    console,
    db_option,
    dumps,
    exit_when_threads_end,
    fail,
    json_option,
    load_app,
    progress_bar,
    reader,
    run,
    saga_ids,
)
from sagakit.errors import ConfigurationError, PayloadError
from sagakit.handle import SagaInfo
from sagakit.journal import ACTIVE, Entry, SagaState
from sagakit.store import DEFAULT_URL
from sagakit.timeline import TimelineRow, timeline

__all__ = ["ExitCode", "db_option", "fail", "json_option", "load_app", "main", "reader", "run"]


def _when(ts: datetime) -> str:
    fmt = "%H:%M:%S" if ts.date() == datetime.now().astimezone().date() else "%Y-%m-%d %H:%M"
    return ts.strftime(fmt)


# Colours of saga states and timeline outcomes.
_STYLE = {
    "completed": "green",
    "compensated": "cyan",
    "failed": "yellow",
    "compensating": "yellow",
    "retrying": "yellow",
    "needs_attention": "bold red",
    "exhausted": "bold red",
    "interrupted": "magenta",
}


def _styled(word: str) -> str:
    style = _STYLE.get(word)
    return f"[{style}]{word}[/]" if style else word


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(package_name="sagakit")
def main() -> None:
    """sagakit: durable sagas on SQLite or PostgreSQL. Start with `sagakit demo`.

    Tab completion: `sagakit completion bash` (or zsh, fish) prints the script to source."""


# -- list --------------------------------------------------------------------------------------


def saga_json(info: SagaInfo, *, payloads: bool = False) -> dict[str, Any]:
    """A saga as JSON-ready values; its decoded input and output too if ``payloads``."""
    fields = (f.name for f in dataclasses.fields(info) if not f.name.startswith("raw_"))
    row = {name: getattr(info, name) for name in fields}
    if payloads:
        row["input"], row["output"] = _payload(info, "input"), _payload(info, "output")
    return row


def _payload(info: SagaInfo, name: str) -> Any:
    try:
        return getattr(info, name)
    except PayloadError as exc:  # show the saga anyway; its payload is what is broken
        return f"<unreadable: {exc}>"


@main.command("list")
@db_option
@click.option("--state", type=click.Choice([s.value for s in SagaState]), help="Only this state.")
@click.option("--type", "saga_type", metavar="TYPE", help="Only sagas of this type.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--offset", type=click.IntRange(min=0), default=0, help="Skip this many (the next page)."
)
@json_option
def list_sagas(
    *, url: str, state: str | None, saga_type: str | None, limit: int, offset: int, as_json: bool
) -> None:
    """List sagas, newest first; page with --limit and --offset."""

    async def fetch() -> list[SagaInfo]:
        async with reader(url) as app:
            return await app.list(state=state, saga_type=saga_type, limit=limit, offset=offset)

    infos = run(fetch())
    if as_json:
        click.echo(dumps([saga_json(i) for i in infos]))
        return
    if not infos:
        click.echo("no sagas match")
        return
    table = Table("id", "type", "state", "current step", "created", "updated", box=None)
    table.columns[0].no_wrap = True
    for i in infos:
        when = _when(i.created_at), _when(i.updated_at)
        state = _styled(i.state) + (" [dim](waiting)[/]" if i.waiting else "")
        table.add_row(i.id, i.saga_type, state, escape(i.current_step or ""), *when)
    console().print(table)


# -- show --------------------------------------------------------------------------------------


def _timeline_table(rows: list[TimelineRow], start: float) -> Table:
    table = Table("at", "step", "attempt", "outcome", "took", "detail", box=None)
    for r in rows:
        took = "" if r.took is None else f"{r.took * 1000:.0f} ms"
        attempt = "" if r.attempt is None else str(r.attempt)
        at = f"+{r.at - start:.3f}s"
        table.add_row(at, escape(r.what), attempt, _styled(r.outcome), took, escape(r.detail))
    return table


def _summary(info: SagaInfo, *, tracked: bool = False) -> Table:
    grid = Table.grid(padding=(0, 2))
    took = (info.updated_at - info.created_at).total_seconds()
    fields = [
        ("saga", info.id),
        ("type", f"{info.saga_type} v{info.version}"),
        ("state", info.state.value),
        ("current step", info.current_step or "-"),
        ("idempotency key", info.idempotency_key or "-"),
        ("created", info.created_at.isoformat(timespec="milliseconds")),
        ("updated", f"{info.updated_at.isoformat(timespec='milliseconds')} (+{took:.3f} s)"),
        ("input", dumps(_payload(info, "input"), indent=None)),
    ]
    if tracked:
        fields.append(("choreographed", "its services' events move it (recorded by a Tracker)"))
    elif info.waiting:
        until = info.wake_at.isoformat(timespec="seconds") if info.wake_at else "a signal"
        fields.append(("waiting", f"unloaded until {until}"))
    if info.parent_id:
        fields.append(("parent", info.parent_id))
    if info.state is SagaState.COMPLETED:
        fields.append(("output", dumps(_payload(info, "output"), indent=None)))
    if info.error:
        fields.append(("error", f"{info.error.get('type')}: {info.error.get('message')}"))
    for name, value in fields:
        grid.add_row(f"[bold]{name}[/]", escape(value))
    return grid


@main.command()
@click.argument("saga_id", shell_complete=saga_ids())
@db_option
@json_option
def show(saga_id: str, url: str, as_json: bool) -> None:
    """Show one saga: its state and the timeline of its journal."""

    async def fetch() -> tuple[SagaInfo, list[Entry]]:
        async with reader(url) as app:
            return await app.get(saga_id), await app.journal(saga_id)

    info, entries = run(fetch())
    rows = timeline(entries, active=info.state in ACTIVE)
    start = entries[0].at if entries else info.created_at.timestamp()
    if as_json:
        saga = saga_json(info, payloads=True)
        steps = [
            {**dataclasses.asdict(r), "at": datetime.fromtimestamp(r.at).astimezone()} for r in rows
        ]
        journal = [dataclasses.asdict(e) for e in entries]
        click.echo(dumps({"saga": saga, "timeline": steps, "journal": journal}))
        return
    out = console()
    tracked = bool(entries and (entries[0].data or {}).get("tracked"))
    out.print(_summary(info, tracked=tracked))
    out.print()
    out.print(_timeline_table(rows, start))


@main.command("check")
@click.option("--app", "target", required=True, metavar="MODULE:ATTR", help="The App to check.")
@json_option
def check_command(target: str, as_json: bool) -> None:
    """Replay every unfinished saga against the App's code; exit 1 if any would break.

    Run it with the code you are about to deploy: it writes nothing.
    """
    from sagakit.check import check, unfinished_count

    app = load_app(target)

    async def go() -> tuple[int, list[Any]]:
        try:
            total = await unfinished_count(app)
            with progress_bar("replaying unfinished sagas", total) as advance:
                return await check(app, progress=advance)
        finally:
            await app.close()

    checked, broken = run(go())
    if as_json:
        click.echo(dumps({"checked": checked, "broken": [dataclasses.asdict(b) for b in broken]}))
    elif broken:
        table = Table("saga", "type", "version", "state", "why it would break", box=None)
        for b in broken:
            table.add_row(b.saga_id, b.saga_type, str(b.version), _styled(b.state),
                          escape(b.reason))  # fmt: skip
        console().print(table)
    else:
        click.echo(f"{checked} unfinished sagas checked: all resume with this code")
    if broken:
        sys.exit(ExitCode.FAILED)


@main.command("graph")
@click.argument("saga_type", metavar="TYPE")
@click.option("--app", "target", required=True, metavar="MODULE:ATTR", help="The App to read.")
@click.option("--version", type=click.IntRange(min=1), help="This version (default: the latest).")
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Code-first sagas: how many recent runs to draw from.",
)
@click.option("--json", "as_json", is_flag=True, help="Print {type, version, mermaid} as JSON.")
def graph_command(
    saga_type: str, target: str, version: int | None, runs: int, as_json: bool
) -> None:
    """Print saga TYPE as a Mermaid flowchart, with its compensation edges.

    Declarative sagas are drawn from their steps; code-first ones from the recorded runs in
    the App's database. Pipe it into a file: `sagakit graph TYPE --app m:app > saga.mmd`.
    """
    from sagakit.graph import graph_for, unknown_type_message

    app = load_app(target)
    saga = app.definition(saga_type, version)
    if saga is None:
        fail(unknown_type_message(app, saga_type, version), ExitCode.NOT_FOUND)

    async def go() -> str | ConfigurationError:
        try:
            return await graph_for(app, saga_type, version=version, runs=runs)
        except ConfigurationError as exc:  # a code-first type without a recorded run
            return exc
        finally:
            await app.close()

    mermaid = run(go())
    if isinstance(mermaid, ConfigurationError):
        fail(str(mermaid), ExitCode.NOT_FOUND)
    if as_json:
        click.echo(dumps({"type": saga_type, "version": saga.version, "mermaid": mermaid}))
    else:
        click.echo(mermaid, nl=False)


# -- completion --------------------------------------------------------------------------------


@main.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion_command(shell: str) -> None:
    """Print the tab-completion script for SHELL. Load it in your shell's start-up file:

    \b
      bash: eval "$(sagakit completion bash)"   (in ~/.bashrc)
      zsh:  eval "$(sagakit completion zsh)"    (in ~/.zshrc)
      fish: sagakit completion fish > ~/.config/fish/completions/sagakit.fish

    Commands, options, states and the ids of recent sagas (from --db) complete.
    """
    from click.shell_completion import get_completion_class

    complete = get_completion_class(shell)
    assert complete is not None  # the choice admits only shells click knows
    ctx = click.get_current_context()
    click.echo(complete(main, {}, "sagakit", "_SAGAKIT_COMPLETE").source())
    ctx.exit(ExitCode.OK)


# -- worker ------------------------------------------------------------------------------------


async def _work(app: App) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    click.echo(
        f"sagakit worker (pid {os.getpid()}) starting on {app.store.location}; "
        "SIGTERM or Ctrl-C stops it",
        err=True,
    )
    await app.run_worker(stop)
    click.echo("sagakit worker stopped; unfinished sagas resume on the next start", err=True)


@main.command()
@click.option(
    "--app",
    "target",
    required=True,
    metavar="MODULE:ATTR",
    help="The sagakit.App to run, e.g. sagakit.examples.order_fulfillment:app.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds that step bodies still running on shutdown get to finish.",
)
def worker(target: str, log_level: str, grace: float) -> None:
    """Execute and recover an App's sagas until SIGTERM or Ctrl-C.

    Commits in flight finish on shutdown; unfinished sagas resume from their journal when a
    worker starts again."""
    try:
        app = load_app(target)
    except click.BadParameter as exc:
        exc.param_hint = "'--app'"
        raise
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run(_work(app))
    exit_when_threads_end(grace)


# -- migrate -----------------------------------------------------------------------------------


@main.command()
@db_option
@json_option
def migrate(url: str, as_json: bool) -> None:
    """Create the database or upgrade its schema, and print the schema version."""

    async def open_db() -> tuple[str, int]:
        async with App(url, worker=False) as app:  # opening creates or migrates
            return app.store.location, await app.store.schema_version()

    location, version = run(open_db())
    if as_json:
        click.echo(dumps({"database": location, "schema_version": version}))
    else:
        click.echo(f"{location}: schema version {version} (up to date)")


# -- demo --------------------------------------------------------------------------------------


@main.command()
@db_option
@click.option("--orders", type=click.IntRange(min=1), default=200, show_default=True)
@click.option(
    "--kills",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Times the worker is SIGKILLed mid-run.",
)
@click.option(
    "--latency",
    type=click.FloatRange(min=0),
    default=0.2,
    show_default=True,
    help="Seconds a simulated service call takes at most.",
)
@click.option("--decline-rate", type=click.FloatRange(0, 1), default=0.1, show_default=True)
@click.option(
    "--shipment-failure-rate", type=click.FloatRange(0, 1), default=0.05, show_default=True
)
def demo(url: str, kills: int, **simulation: Any) -> None:
    """Run orders through a worker that is SIGKILLed mid-run, then check the outcome.

    Deletes the previous demo's database and ledger first, and leaves the new ones, so
    `sagakit list` and `sagakit show ID` work afterwards."""
    from sagakit.demo import DemoConfig, ProgressObserver, kill_points, render_report, run_demo

    config = DemoConfig(url=url, kill_at=kill_points(kills), **simulation)
    out = Console()
    with ProgressObserver(out) as observer:
        report = run(run_demo(config, observer), cleanup=observer.stop)
    render_report(report, out, db_option="" if url == DEFAULT_URL else f" --db {url}")
    for violation in report.violations():
        Console(stderr=True).print(f"[bold red]invariant violated:[/] {escape(violation)}")
    if report.violations():
        sys.exit(ExitCode.FAILED)


# Commands defined in their own modules register themselves on ``main`` when imported.
from sagakit import cli_bench, cli_operator, cli_serve  # noqa: E402, F401
