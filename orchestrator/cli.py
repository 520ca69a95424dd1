"""`spotune`: the typer app. Commands live in orchestrator/commands/; this module wires them up
and turns user errors into one line and exit code 2 (never a traceback)."""
from __future__ import annotations

import functools
import sys
from typing import Optional

import typer

from orchestrator import __version__
from orchestrator.errors import UserError

app = typer.Typer(
    name="spotune",
    help="Fine-tune language models at the lowest real cost: plan, launch, resume after preemption, audit spend.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Globals:
    state_dir: Optional[str] = None
    db: Optional[str] = None


@app.callback()
def _root(
    state_dir: Optional[str] = typer.Option(None, "--state-dir", help="State directory (default $SPOTUNE_STATE_DIR or ./state)."),
    db: Optional[str] = typer.Option(None, "--db", help="Ledger database URL (default $SPOTUNE_DB or SQLite in the state dir)."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        typer.echo(f"spotune {__version__}")
        raise typer.Exit()
    Globals.state_dir = state_dir
    Globals.db = db


def _one_line_user_errors(callback):
    """A UserError from any command is one line on stderr and exit 2, also under CliRunner."""

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def _register_all() -> None:
    from orchestrator.commands import register_all

    register_all(app)
    for command in app.registered_commands:
        command.callback = _one_line_user_errors(command.callback)


_register_all()


def main() -> None:
    try:
        app()
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
