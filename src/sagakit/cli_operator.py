"""The operator commands of ``sagakit``: ``signal``, ``cancel``, ``retry`` and ``resolve``.

Each opens the database with ``App(url, worker=False)``: the worker that executes the saga
picks the change up (at once on PostgreSQL, within its poll interval on SQLite). An unknown
saga exits with code 3, a saga whose state refuses the action with code 4 (nothing written);
``--json`` prints what was done as one JSON object.
"""

from __future__ import annotations

import json

import click

from sagakit.cli import main
from sagakit.cli_base import ExitCode, db_option, dumps, fail, json_option, reader, run, saga_ids


@main.command("signal")
@click.argument("saga_id", shell_complete=saga_ids())
@click.argument("name")
@click.argument("payload", default="null")
@click.option("--id", "signal_id", metavar="ID", help="Signal id; a repeat of it is a no-op.")
@db_option
@json_option
def signal_command(
    saga_id: str, name: str, payload: str, *, signal_id: str | None, url: str, as_json: bool
) -> None:
    """Send signal NAME with a JSON PAYLOAD to a saga, e.g.
    ``sagakit signal ID decision '{"approve": true, "by": "ann"}'``.

    The signal is stored first and delivered when the saga waits for it (a worker running
    the saga picks it up within its poll interval).
    """
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as exc:
        fail(
            f"PAYLOAD must be JSON, e.g. '{{\"approve\": true}}' ({exc}); nothing was sent",
            ExitCode.USAGE,
        )

    async def send() -> bool:
        async with reader(url) as app:
            return await app.signal(saga_id, name, value, signal_id=signal_id)

    sent = run(send())
    if as_json:
        click.echo(dumps({"saga_id": saga_id, "signal": name, "sent": sent}))
    else:
        click.echo(f"signal {name!r} {'sent to' if sent else 'was already sent to'} saga {saga_id}")


@main.command("cancel")
@click.argument("saga_id", shell_complete=saga_ids())
@click.option("--reason", default="", help="Why; recorded in the saga's journal.")
@db_option
@json_option
def cancel_command(saga_id: str, reason: str, url: str, as_json: bool) -> None:
    """Cancel a saga: it compensates the steps it completed and ends cancelled."""

    async def cancel() -> None:
        async with reader(url) as app:
            await app.cancel(saga_id, reason=reason)

    run(cancel())
    if as_json:
        click.echo(dumps({"saga_id": saga_id, "action": "cancel", "reason": reason}))
    else:
        click.echo(f"saga {saga_id} is cancelled; it compensates when a worker runs it next")


@main.command("retry")
@click.argument("saga_id", shell_complete=saga_ids("needs_attention"))
@db_option
@json_option
def retry_command(saga_id: str, url: str, as_json: bool) -> None:
    """Resume a saga in needs_attention (after the cause was fixed)."""

    async def retry() -> None:
        async with reader(url) as app:
            await app.retry(saga_id)

    run(retry())
    if as_json:
        click.echo(dumps({"saga_id": saga_id, "action": "retry"}))
    else:
        click.echo(f"saga {saga_id} resumes when a worker runs it next")


@main.command("resolve")
@click.argument("saga_id", shell_complete=saga_ids("needs_attention"))
@click.option("--note", required=True, help="What was done by hand; recorded in the journal.")
@db_option
@json_option
def resolve_command(saga_id: str, note: str, url: str, as_json: bool) -> None:
    """Mark a saga in needs_attention as settled by hand; it ends failed with your note."""

    async def resolve() -> None:
        async with reader(url) as app:
            await app.resolve(saga_id, note)

    run(resolve())
    if as_json:
        click.echo(dumps({"saga_id": saga_id, "action": "resolve", "note": note}))
    else:
        click.echo(f"saga {saga_id} is resolved")
