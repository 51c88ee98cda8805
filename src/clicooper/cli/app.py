"""The ``clicooper`` Typer app and what every command shares: one-line failures, configs."""

from __future__ import annotations

import signal
from pathlib import Path

import typer

from clicooper.cli.progress import console
from clicooper.config import ConfigError, RunConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Client-cooperative split learning with activation DP, secret label "
    "obfuscation and dynamic chained watermarking.",
)

Opt = typer.Option


@app.callback()
def _root() -> None:
    """Client-cooperative split learning (run ``clicooper COMMAND --help``)."""


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit."""
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def interrupted(message: str) -> None:
    """Exit with status 130 after Ctrl-C, SIGTERM or SIGHUP, ignoring any further one.

    A repeated Ctrl-C while the process exits must not turn the clean 130 into a
    traceback; ``main`` then leaves without the interpreter's finalization.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    console.print(message)
    raise typer.Exit(130)


def build_config(config: Path | None, **flags: object) -> RunConfig:
    try:
        return RunConfig.load(config, **flags)
    except ConfigError as exc:
        fail(str(exc))
        raise  # unreachable
