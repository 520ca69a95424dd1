"""`spotune`: the typer app. Commands live in orchestrator/commands/; this module wires them up,
puts the global options on Typer's context, and is the one place where user errors become one
line and exit code 2 (never a traceback).

Help and usage read as the README writes them: `-h` works everywhere, usage says `SPEC`, flags show
no `<bool>`, and a usage mistake (unknown option, bad value) is one `error:` line too.
"""
from __future__ import annotations

import sys
from typing import Optional

import typer
from typer import _click as click
from typer.core import TyperCommand
from typer.core import TyperGroup

from contract.errors import UserError
from contract.files import escape_controls
from orchestrator import __version__
from orchestrator.commands import flags
from orchestrator.settings import GlobalOptions


def _plain_metavars(params) -> list:
    """Flags take no value, so their help shows none (Typer would say `<bool>`); arguments are
    named in capitals, as the README writes them (SPEC, JOB)."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
        elif p.param_type_name == "argument" and p.metavar is None and p.name:
            p.metavar = p.name.upper()
    return params


def _usage_pieces(command, ctx) -> list[str]:
    pieces = [command.options_metavar] if command.options_metavar else []
    for p in command.get_params(ctx):
        if p.param_type_name == "argument":
            name = p.metavar or p.name.upper()
            pieces.append(name if p.required else f"[{name}]")
    return pieces


class _Command(TyperCommand):
    """Every command: usage `spotune plan [OPTIONS] SPEC`, not Typer's `{spec}`."""

    def get_params(self, ctx):
        return _plain_metavars(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        return _usage_pieces(self, ctx)


class _ErrorBoundary(TyperGroup):
    """Every command runs inside `invoke`: a UserError from any of them (or from the root callback)
    is `error: <message>` on stderr and its exit code (2), under the console script and under
    CliRunner alike; Ctrl-C that no command handles is `interrupted`, exit 130. Usage mistakes,
    which Click finds before any command runs, are caught in `main` and said the same way."""

    def get_params(self, ctx):
        return _plain_metavars(super().get_params(ctx))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            typer.echo(f"error: {_usage_error(e)}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("interrupted", err=True)
            sys.exit(130)
        # Without standalone mode Click returns an Exit's code, or the command's own return value.
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.ClickException):
            raise  # Click's own control flow and usage errors: `main` says them
        except UserError as e:
            typer.echo(f"error: {escape_controls(str(e).strip())}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:  # a bug, not the user's doing: one line here, the trace in a file
            typer.echo(f"error: internal: {_internal_error(ctx, e)}", err=True)
            raise typer.Exit(1) from None


INTERNAL_MESSAGE_CHARS = 500
TRACE_FRAMES = 1_000


def _internal_error(ctx, error: BaseException) -> str:
    """`<type>: <message> (full trace: PATH)`, with the trace written to <state>/logs/internal-<time>.log
    (or the temp dir where the state dir cannot be written, e.g. on a full disk). Both pass through
    the redactor: an exception message may quote a URL with its password or a token."""
    import traceback

    from orchestrator.redact import redact
    from orchestrator.settings import global_options

    message = redact(escape_controls(f"{type(error).__name__}: {str(error).strip()}"))
    if len(message) > INTERNAL_MESSAGE_CHARS:
        message = message[:INTERNAL_MESSAGE_CHARS - 1] + "…"
    # An explicit limit: SkyPilot sets sys.tracebacklimit = 0 around calls that raise and leaves it
    # so when they do (sky/utils/ux_utils.py print_exception_no_traceback), which would empty the trace.
    trace = redact("".join(traceback.format_exception(error, limit=TRACE_FRAMES)))
    try:
        state = global_options(ctx).state_path()
    except Exception:  # the settings themselves may be what failed
        state = None
    return f"{message} ({_write_trace(trace, state)})"


def _write_trace(trace: str, state) -> str:
    import os
    import tempfile
    from datetime import datetime, timezone
    from pathlib import Path

    name = f"internal-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{os.getpid()}.log"
    failure = None
    for folder in ([Path(state) / "logs"] if state is not None else []) + [Path(tempfile.gettempdir())]:
        path = folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(trace)
            return f"full trace: {path}"
        except OSError as e:
            failure = e.strerror or str(e)
    return f"the full trace could not be written: {failure}"


def _usage_error(e) -> str:
    """Click's message in one line, with where to read the usage: `No such option: -x (see spotune plan -h)`."""
    message = escape_controls(" ".join(e.format_message().split()))
    ctx = getattr(e, "ctx", None)
    return f"{message} (see {ctx.command_path} -h)" if ctx is not None else message


app = typer.Typer(
    cls=_ErrorBoundary,
    name="spotune",
    help="Fine-tune language models at the lowest real cost: plan, launch, resume after preemption, audit spend.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"spotune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    state_dir: Optional[str] = typer.Option(
        None, "--state-dir", metavar="DIR", callback=flags.state_dir,
        help="State directory (default $SPOTUNE_STATE_DIR, else the nearest ./state holding a ledger.db, "
             "walking up from here as git finds .git, else ./state)."),
    db: Optional[str] = typer.Option(None, "--db", metavar="URL", callback=flags.database_url,
                                     help="Ledger database URL (default $SPOTUNE_DB or SQLite in the state dir)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    # Commands read these back with orchestrator.settings.global_options().
    ctx.obj = GlobalOptions(state_dir=state_dir, db=db)


def _register_all() -> None:
    from orchestrator.commands import register_all

    register_all(app)
    for command in app.registered_commands:
        if command.cls in (None, TyperCommand):  # Typer's default: give it the README's usage
            command.cls = _Command


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
