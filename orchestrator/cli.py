"""`spotune`: the typer app. Commands live in orchestrator/commands/; this module wires them up,
puts the global options on Typer's context, and is the one place where user errors become one
line and exit code 2 (never a traceback)."""
from __future__ import annotations

from typing import Optional

import typer
from typer.core import TyperGroup

from contract.errors import UserError
from orchestrator import __version__
from orchestrator.settings import GlobalOptions


class _ErrorBoundary(TyperGroup):
    """Every command runs inside `invoke`: a UserError from any of them (or from the root callback)
    is `error: <message>` on stderr and its exit code (2), under the console script and under
    CliRunner alike; Ctrl-C that no command handles is `interrupted`, exit 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_ErrorBoundary,
    name="spotune",
    help="Fine-tune language models at the lowest real cost: plan, launch, resume after preemption, audit spend.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"spotune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    state_dir: Optional[str] = typer.Option(None, "--state-dir", help="State directory (default $SPOTUNE_STATE_DIR or ./state)."),
    db: Optional[str] = typer.Option(None, "--db", help="Ledger database URL (default $SPOTUNE_DB or SQLite in the state dir)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    # Commands read these back with orchestrator.settings.global_options().
    ctx.obj = GlobalOptions(state_dir=state_dir, db=db)


def _register_all() -> None:
    from orchestrator.commands import register_all

    register_all(app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
