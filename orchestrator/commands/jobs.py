"""`spotune launch | status | logs | cancel | resume`: a job's life from the command line.

Bad input (missing spec, unknown backend or job, no feasible option) is found before anything is
written: spec, backend and plan come first, the ledger is opened only to record a job that will
really be submitted.
"""
from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from orchestrator.format import duration, placement_label
from orchestrator.format import usd_fine as _usd  # cents; four decimals for the sub-dollar amounts tiny jobs cost

if TYPE_CHECKING:
    from orchestrator.watch import Tick
    from orchestrator.ledger import Ledger


def _console():
    from orchestrator.commands import make_console

    return make_console()


def _state_dir(ctx: typer.Context) -> Path:
    from orchestrator.settings import global_options

    return global_options(ctx).state_path()


def _ledger(ctx: typer.Context) -> "Ledger":
    from orchestrator.settings import global_options

    return global_options(ctx).ledger()


class ProgressPrinter:
    """Prints what changed since the last tick: attempt starts and ends, progress every 10%."""

    def __init__(self, console):
        self.console = console
        self.started: set[int] = set()
        self.ended: set[int] = set()
        self.last_decile = -1
        self.status: Optional[str] = None

    def __call__(self, tick: "Tick") -> None:
        p = tick.progress
        for a in tick.attempts:
            if a.n not in self.started and (a.n in p.started_attempts or a.ended_at is not None):
                self.started.add(a.n)
                resumed = f", resuming from step {a.resumed_from_step}" if a.resumed_from_step else ""
                self.console.print(f"[bold]attempt {a.n}[/] started on {placement_label(a)}{resumed}")
        if p.step is not None and p.total_steps:
            decile = min(10, p.step * 10 // p.total_steps)
            if decile > self.last_decile:
                self.last_decile = decile
                tps = f" · {p.tokens_per_second:,.0f} tokens/s" if p.tokens_per_second else ""
                loss = f" · loss {p.loss:.3f}" if p.loss is not None else ""
                self.console.print(f"  step {p.step}/{p.total_steps}{loss}{tps} · spent {_usd(tick.spent)}")
        for a in tick.attempts:
            if a.ended_at is not None and a.n not in self.ended:
                self.ended.add(a.n)
                self.started.add(a.n)
                seconds = (a.ended_at - a.started_at).total_seconds()
                cost = Decimal(str(seconds)) / 3600 * a.price_per_hour
                colour = {"finished": "green", "preempted": "yellow"}.get(a.end_reason, "red")
                self.console.print(f"[bold]attempt {a.n}[/] [{colour}]{a.end_reason}[/] after {duration(seconds)}"
                                   f" · {_usd(cost)} · {a.detail or ''}")
        if tick.job.status != self.status:
            self.status = tick.job.status
            if tick.job.status in ("recovering", "over_budget", "failed", "cancelled"):
                why = tick.job.failure_reason or tick.detail
                self.console.print(f"job [bold]{tick.job.status}[/]" + (f": {why}" if why else ""))


def render_job(console, ledger: "Ledger", job_id: str) -> None:
    """The job's ledger entry, exactly as `spotune ledger JOB` shows it."""
    from orchestrator.report import print_job

    console.print()
    print_job(console, ledger, job_id)


def _watch(console, ledger: "Ledger", watcher, job_id: str) -> int:
    try:
        final = watcher.watch(on_tick=ProgressPrinter(console))
    except KeyboardInterrupt:
        console.print(f"\nstopped watching; the job keeps running. Re-attach with: spotune resume {job_id}")
        raise typer.Exit(130)
    render_job(console, ledger, job_id)
    return 0 if final.job.status == "succeeded" else 1


def _dry_run(console, spec, backend, plan, chosen, state: Path) -> None:
    from orchestrator.jobs import dry_run

    console.print(f"[bold]dry run[/]: would record job '{spec.name}' with the estimate above and submit it to {backend.name}; nothing written.")
    console.print(dry_run(spec, backend, plan, chosen, state), markup=False, soft_wrap=True)


def launch(
    ctx: typer.Context,
    spec: Path = typer.Argument(..., help="Job spec YAML."),
    backend: str = typer.Option("local", "--backend", "-b", help="Where to run: local, skypilot or ray."),
    option: Optional[int] = typer.Option(None, "--option", help="Plan option to launch (rank; default: the best)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be launched; write nothing."),
    detach: bool = typer.Option(False, "--detach", help="Submit and return; watch later with `spotune resume JOB`."),
    price_per_hour: Optional[float] = typer.Option(None, "--price-per-hour", help="Local backend: what an hour of this machine costs (default: spec local.price_per_hour)."),
    simulate_preemptions: Optional[int] = typer.Option(None, "--simulate-preemptions", help="Local backend: preempt the training process N times at seeded random steps."),
    hard: bool = typer.Option(False, "--hard", help="Simulated preemptions send SIGKILL (no checkpoint) instead of SIGTERM."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for when simulated preemptions happen (default 0)."),
    restart_seconds: Optional[float] = typer.Option(None, "--restart-seconds", help="Local backend: wait before restarting after a preemption (default 3)."),
    poll_seconds: Optional[float] = typer.Option(None, "--poll-seconds", help="How often to poll the backend while watching (default: the backend's, 1 s locally)."),
) -> None:
    """Plan, record the estimate, launch, and watch the job to the end (ledger: estimate vs actual)."""
    from orchestrator import jobs, watch
    from contract.spec import load_spec

    console = _console()
    job_spec = load_spec(spec)
    if simulate_preemptions is not None and simulate_preemptions < 0:
        raise jobs.JobError("--simulate-preemptions must be 0 or more")
    chosen_backend = jobs.make_backend(backend, _state_dir(ctx), simulate_preemptions=simulate_preemptions, hard=hard,
                                       seed=seed, restart_seconds=restart_seconds)
    plan = jobs.make_job_plan(job_spec, chosen_backend, price_per_hour)
    chosen = jobs.choose_option(plan, option)
    console.print(f"[bold]plan[/] {plan.job}: {plan.model_name} {plan.method}, {plan.total_tokens:,} tokens · "
                  f"option {chosen.rank} of {len(plan.options)}: {chosen.placement.label()}"
                  f" · {chosen.tokens_per_second:,.0f} tokens/s · {chosen.expected_hours:.4f} h · "
                  f"expected {_usd(chosen.expected_cost)}")
    if dry_run:
        _dry_run(console, job_spec, chosen_backend, plan, chosen, _state_dir(ctx))
        return
    ledger = _ledger(ctx)
    submitted = jobs.submit_job(ledger, spec, job_spec, chosen_backend, plan, chosen, _state_dir(ctx))
    console.print(f"job [bold]{submitted.job_id}[/] submitted to {backend} ({submitted.external_id})")
    if detach:
        console.print(f"watch it with: spotune resume {submitted.job_id}   (or spotune status / logs {submitted.job_id})")
        return
    watcher = watch.Watcher(ledger, submitted.job_id, chosen_backend, submitted.external_id, poll_seconds)
    raise typer.Exit(_watch(console, ledger, watcher, submitted.job_id))


def status(ctx: typer.Context,
           job: Optional[str] = typer.Argument(None, help="Job id (or a unique prefix); all jobs when left out.")) -> None:
    """A table of jobs, or one job's detail (synced with its backend first)."""
    from rich.table import Table

    from orchestrator.ledger_tables import TERMINAL_STATUSES
    from orchestrator.quote import money
    from orchestrator.reconcile import spend

    console, ledger = _console(), _ledger(ctx)
    if job is not None:
        record = ledger.get_job(job)
        if record.status not in TERMINAL_STATUSES and record.external_id is not None:
            from orchestrator.watch import attach

            attach(ledger, record.id, state_dir=_state_dir(ctx)).sync()
        render_job(console, ledger, record.id)
        return
    records = ledger.list_jobs()
    live = [r for r in records if r.status not in TERMINAL_STATUSES and r.external_id is not None]
    if live:
        from contract.errors import UserError
        from orchestrator.watch import attach

        for r in live:
            try:
                attach(ledger, r.id, state_dir=_state_dir(ctx)).sync()
            except UserError:
                pass  # backend unreachable: show what the ledger last knew
        records = ledger.list_jobs()
    if not records:
        console.print("no jobs in the ledger yet: spotune launch SPEC.yaml")
        return
    table = Table()
    for column in ("job", "status", "backend", "created", "attempts", "estimate", "actual"):
        table.add_column(column, justify="right" if column in ("attempts", "estimate", "actual") else "left")
    for r in records:
        # Attempts alone give the actual cost (reconcile's own sum): no job's samples are read here.
        attempts = ledger.attempts(r.id)
        table.add_row(r.id, r.status, r.backend, f"{r.created_at:%Y-%m-%d %H:%M}", str(len(attempts)),
                      f"${money(r.estimate.expected_cost):,.2f}", f"${money(spend(attempts)):,.2f}")
    console.print(table)


def logs(ctx: typer.Context,
         job: str = typer.Argument(..., help="Job id (or a unique prefix)."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends.")) -> None:
    """The recipe's output, attempt by attempt."""
    from orchestrator.jobs import backend_errors
    from orchestrator.watch import attach

    watcher = attach(_ledger(ctx), job, state_dir=_state_dir(ctx))
    try:
        with backend_errors(watcher.job_id):
            for line in watcher.backend.logs(watcher.external_id, follow=follow):
                typer.echo(line)
    except KeyboardInterrupt:
        raise typer.Exit(130)


def cancel(ctx: typer.Context,
           job: str = typer.Argument(..., help="Job id (or a unique prefix)."),
           wait: float = typer.Option(300.0, "--wait", help="Seconds to wait for the checkpoint and stop.")) -> None:
    """Stop a job gracefully: the recipe checkpoints first, then the job is marked cancelled."""
    from orchestrator.watch import cancel_job
    from orchestrator.ledger_tables import TERMINAL_STATUSES

    console, ledger = _console(), _ledger(ctx)
    record = ledger.get_job(job)
    if record.status in TERMINAL_STATUSES:
        console.print(f"job {record.id} already ended: {record.status}")
        return
    final = cancel_job(ledger, record.id, wait_seconds=wait, state_dir=_state_dir(ctx))
    if final.job.status not in TERMINAL_STATUSES:
        console.print(f"job {record.id} is still stopping after {wait:.0f} s (status {final.job.status}); "
                      f"check again with: spotune status {record.id}")
        raise typer.Exit(1)
    console.print(f"job {record.id}: {final.job.status}" + (f" ({final.job.failure_reason})" if final.job.failure_reason else ""))


def resume(ctx: typer.Context,
           job: str = typer.Argument(..., help="Job id (or a unique prefix)."),
           poll_seconds: Optional[float] = typer.Option(None, "--poll-seconds", help="How often to poll the backend (default: the backend's, 1 s locally).")) -> None:
    """Re-attach to a job (after the CLI died or was detached) and watch it to the end."""
    from orchestrator.watch import attach

    console, ledger = _console(), _ledger(ctx)
    watcher = attach(ledger, job, poll_seconds=poll_seconds, state_dir=_state_dir(ctx))
    console.print(f"re-attached to [bold]{watcher.job_id}[/] on {ledger.get_job(watcher.job_id).backend} ({watcher.external_id})")
    raise typer.Exit(_watch(console, ledger, watcher, watcher.job_id))


def register(app: typer.Typer) -> None:
    app.command("launch")(launch)
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("cancel")(cancel)
    app.command("resume")(resume)
