"""CLI commands, one module per area; each exposes `register(app)`.

Imports of heavy modules (planner data, SQLAlchemy, sky) stay inside the command bodies so
that `spotune --help` starts fast and never imports torch or sky.
"""
import importlib

AREAS = ("plan", "catalog", "jobs", "ledger", "calibrate")


def register_all(app) -> None:
    for area in AREAS:
        importlib.import_module(f"orchestrator.commands.{area}").register(app)


def make_console(stderr: bool = False):
    """A rich console for command output. Piped output (CI logs, `| less`) gets 160 columns instead of
    rich's default 80, so ranked tables keep every column readable."""
    import os

    from rich.console import Console

    console = Console(highlight=False, stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, stderr=stderr, width=160)
    return console
