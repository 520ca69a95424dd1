"""CLI commands, one module per area; each exposes `register(app)`.

Imports of heavy modules (planner data, SQLAlchemy, sky) stay inside the command bodies so
that `spotune --help` starts fast and never imports torch or sky.
"""
import importlib

AREAS = ("plan", "catalog", "jobs", "ledger")


def register_all(app) -> None:
    for area in AREAS:
        try:
            module = importlib.import_module(f"orchestrator.commands.{area}")
        except ModuleNotFoundError as e:
            if e.name == f"orchestrator.commands.{area}":
                continue  # area not built yet
            raise
        module.register(app)
