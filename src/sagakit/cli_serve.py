"""``sagakit serve``: the REST API of an App over HTTP (needs ``pip install sagakit[api]``).

Auth is a bearer token from ``--token-file`` or ``SAGAKIT_API_TOKEN``; without one the server
refuses to start, unless ``--insecure`` is given and it binds a loopback address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sagakit.cli import main
from sagakit.cli_base import ExitCode, exit_when_threads_end, fail, load_app, run

if TYPE_CHECKING:
    from fastapi import FastAPI

    from sagakit.app import App

TOKEN_ENV = "SAGAKIT_API_TOKEN"  # noqa: S105 (the variable's name, not a secret)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(token_file: Path | None) -> str | None:
    """The token of ``token_file`` if given, else of ``$SAGAKIT_API_TOKEN``; None if neither."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            fail(f"cannot read the token file {token_file}: {exc.strerror or exc}", ExitCode.USAGE)
        if not token:
            fail(
                f"the token file {token_file} is empty; put a long random secret in it",
                ExitCode.USAGE,
            )
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


@main.command("serve")
@click.option(
    "--app",
    "target",
    required=True,
    metavar="MODULE:ATTR",
    help="The sagakit.App to serve, e.g. sagakit.examples.order_fulfillment:app.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"File holding the bearer token (default: the environment variable {TOKEN_ENV}).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Serve without a token; allowed only on a loopback address such as 127.0.0.1.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--metrics",
    is_flag=True,
    help="Also serve Prometheus metrics at /metrics (behind the token): pip install "
    "'sagakit[metrics]'.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds that step bodies still running on shutdown get to finish.",
)
def serve_command(
    *,
    target: str,
    host: str,
    port: int,
    token_file: Path | None,
    insecure: bool,
    log_level: str,
    grace: float,
    metrics: bool,
) -> None:
    """Serve an App's sagas over a REST API under /api (OpenAPI at /openapi.json).

    Every request needs 'Authorization: Bearer <token>'. This process also executes the
    App's sagas, unless another process already does (then it only starts and reads them).
    SIGTERM or Ctrl-C stops it.
    """
    token = read_token(token_file)
    if token is None and not insecure:
        fail(
            f"no API token: set {TOKEN_ENV} or pass --token-file PATH (a long random secret); "
            "to serve without auth on this machine only, pass --insecure",
            ExitCode.USAGE,
        )
    if token is None and not is_loopback(host):
        fail(
            f"--insecure serves without auth, so it binds only a loopback address, not {host!r}; "
            f"use --host 127.0.0.1, or set {TOKEN_ENV} to serve on {host}",
            ExitCode.USAGE,
        )
    try:
        from sagakit.api import create_api
    except ImportError as exc:
        fail(f"sagakit serve needs FastAPI and uvicorn: pip install 'sagakit[api]' ({exc})")
    try:
        app = load_app(target)
    except click.BadParameter as exc:
        exc.param_hint = "'--app'"
        raise
    meter = None
    if metrics:
        try:
            from sagakit.observability import Metrics
        except ImportError as exc:
            fail(f"--metrics needs prometheus-client: pip install 'sagakit[metrics]' ({exc})")
        meter = Metrics()
        app.middleware = (*app.middleware, meter)  # before the App opens: its runner uses it
    api = create_api(app, token=token, metrics=meter)
    run(_serve(app, api, host=host, port=port, log_level=log_level))
    exit_when_threads_end(grace)


async def _serve(app: App, api: FastAPI, *, host: str, port: int, log_level: str) -> None:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(api, host=host, port=port, log_level=log_level))
    # uvicorn re-raises SIGTERM once it has stopped, which would kill the process before the
    # App closes; these handlers stop it instead, and the App then closes cleanly.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]

    def stop() -> None:
        server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    async with app:
        await server.serve()
    click.echo("sagakit serve stopped; unfinished sagas resume on the next start", err=True)
