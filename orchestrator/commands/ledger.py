"""`spotune ledger [JOB]`: what every job cost against its estimate, and why (price, throughput,
preemption); one job's attempts timeline, checkpoints and variance story. `--json`, `--csv`,
`--plot FILE.png` and `--html FILE.html` give the same figures to machines, spreadsheets and people
(orchestrator/report.py, report_plot.py, report_html.py). Reading creates no ledger.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer

from contract.errors import UserError


def _writable(path: Path, what: str) -> None:
    if not path.parent.exists():
        raise UserError(f"cannot write {what}: directory {path.parent} does not exist")


def ledger(
    ctx: typer.Context,
    job: Optional[str] = typer.Argument(None, help="Job id (or a unique prefix): its attempts, checkpoints and variance story."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: jobs with estimate, actual, variance split, attempts; totals (docs/json.md)."),
    as_csv: bool = typer.Option(False, "--csv", help="Print one CSV row per job."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE.png",
                                        help="Write a PNG of estimate vs actual per job, with the variance split (needs the `plot` extra)."),
    html: Optional[Path] = typer.Option(None, "--html", metavar="FILE.html",
                                        help="Write a self-contained HTML report: estimate vs actual, attempts on a timeline, "
                                             "the variance split and the loss curve."),
) -> None:
    """What each job cost against its estimate, and why: price, throughput, preemption."""
    from orchestrator import report
    from orchestrator.commands import make_console
    from orchestrator.settings import global_options

    if as_json and as_csv:
        raise UserError("--json and --csv are alternatives; give one")
    if plot is not None:
        from orchestrator.report_plot import require_matplotlib

        require_matplotlib()
        _writable(plot, "plot")
    if html is not None:
        _writable(html, "the HTML report")
    options = global_options(ctx)
    label = options.ledger_label()
    opened = options.existing_ledger()
    if opened is None and job is not None:
        raise UserError(f"no job matching {job!r} in the ledger ({label} does not exist yet)")
    now = datetime.now(timezone.utc)
    with (opened or _Empty()) as led:
        jobs = [led.get_job(job)] if job is not None else led.list_jobs()
        entries = report.build_entries(led, jobs, now, samples=html is not None)
    if plot is not None:
        from orchestrator.report_plot import write_plot

        write_plot(entries, plot)
    totals = report.totals(entries)
    if html is not None:
        from orchestrator.report_html import write_html

        write_html(entries, totals, html, label, now)
    if as_json:
        typer.echo(report.to_json_text(entries, totals, label))
        return
    if as_csv:
        typer.echo(report.to_csv_text(entries), nl=False)
        return
    console = make_console()
    if job is not None:
        report.render_job(console, entries[0])
    elif not entries:
        console.print(f"no jobs yet ({label}{'' if opened else ': not created yet'})", highlight=False)
    else:
        report.render_all(console, entries, totals)
    for path, what in ((plot, "plot"), (html, "HTML report")):
        if path is not None:
            console.print(f"{what} written to {path}", highlight=False)
    if entries:
        console.print(f"[dim]{label}[/]", highlight=False)


class _Empty:
    """Stands in for a ledger that does not exist yet."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def list_jobs(self):
        return []


def register(app: typer.Typer) -> None:
    app.command("ledger")(ledger)
