"""`spotune launch | status | logs | cancel | resume`: a job's life from the command line.

Bad input (missing spec, unknown backend or job, no feasible option) is found before anything is
written: spec, backend and plan come first, the ledger is opened only to record a job that will
really be submitted. Commands that only read (status, logs) never create a ledger, and every
command says which ledger it used.
"""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from contract.errors import UserError
from orchestrator.commands import flags
from orchestrator.format import phrases, usd_exact, usd_fine

if TYPE_CHECKING:
    from orchestrator.ledger import Ledger


def _console(stderr: bool = False):
    from orchestrator.commands import make_console

    return make_console(stderr=stderr)


def _options(ctx: typer.Context):
    from orchestrator.settings import global_options

    return global_options(ctx)


def _state_dir(ctx: typer.Context) -> Path:
    return _options(ctx).state_path()


def _existing_ledger(ctx: typer.Context, job: Optional[str]) -> "Optional[Ledger]":
    """The ledger for a command that only reads: None (nothing created) where there is none yet; with
    a job named, that is the one-line error saying which ledger was looked in."""
    opened = _options(ctx).existing_ledger()
    if opened is None and job is not None:
        raise UserError(f"no job matching {job!r} in the ledger ({_options(ctx).ledger_label()} does not exist yet)")
    return opened


def _say_ledger(console, ctx: typer.Context) -> None:
    console.print(f"[dim]{_options(ctx).ledger_label()}[/]", highlight=False)


def render_job(console, ledger: "Ledger", job_id: str) -> None:
    """The job's ledger entry, exactly as `spotune ledger JOB` shows it."""
    from orchestrator.report import print_job

    console.print()
    print_job(console, ledger, job_id)


def _watch(console, ctx: typer.Context, ledger: "Ledger", watcher, job_id: str) -> int:
    from orchestrator.watch_output import ProgressPrinter

    try:
        final = watcher.watch(on_tick=ProgressPrinter(console))
    except KeyboardInterrupt:
        console.print(f"\nstopped watching; the job keeps running. Re-attach with: spotune resume {job_id}")
        raise typer.Exit(130)
    render_job(console, ledger, job_id)
    output = output_location(ledger, job_id)
    if output:
        console.print(f"[bold]output[/]: {output}", highlight=False)
    _say_ledger(console, ctx)
    return 0 if final.job.status == "succeeded" else 1


def output_location(ledger: "Ledger", job_id: str) -> Optional[str]:
    """Where the trained adapter or weights are, as the recipe's `finished` event says (on a
    cloud run, the durable store's URL, not the node's disk)."""
    finished = [e for e in ledger.run_events(job_id) if e.event == "finished"]
    return str(finished[-1].payload.get("output_path") or "") or None if finished else None


def _say_left_out(console, plan, chosen, backend_name: str, shown: int = 3) -> None:
    """Cheaper options the backend cannot launch, with its reason: why the chosen one is not the
    catalog's cheapest (`spotune plan --backend B` lists them all)."""
    cheaper = [r for r in plan.rejected if r.reason == "not_launchable" and r.expected_cost is not None
               and r.expected_cost < chosen.expected_cost]
    if not cheaper:
        return
    count = plan.assumptions.get("rejected_counts", {}).get("not_launchable", len(cheaper))
    console.print(f"{count:,} option(s) {backend_name} cannot launch were left out; the cheapest:", highlight=False)
    for r in cheaper[:shown]:
        console.print(f"  {r.offer.provider}/{r.offer.region} {r.offer.gpu} x{r.offer.gpu_count}"
                      f"{' spot' if r.spot else ''} {usd_fine(r.expected_cost)}: {r.detail}", markup=False, highlight=False)


def launch(
    ctx: typer.Context,
    spec: Path = typer.Argument(..., help="Job spec YAML."),
    backend: str = typer.Option("local", "--backend", "-b", help="Where to run: local, skypilot or ray."),
    option: Optional[int] = typer.Option(None, "--option", callback=flags.count(1, 10**6), help="Plan option to launch (rank; default: the best)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be launched (on stdout; the plan on stderr); write nothing."),
    detach: bool = typer.Option(False, "--detach", help="Submit and return; watch later with `spotune resume JOB`."),
    price_per_hour: Optional[float] = typer.Option(None, "--price-per-hour", callback=flags.price_per_hour, help="Local backend: what an hour of this machine costs (default: spec local.price_per_hour)."),
    simulate_preemptions: Optional[int] = typer.Option(None, "--simulate-preemptions", callback=flags.count(0, 1000), help="Local backend: preempt the training process N times at seeded random steps."),
    hard: bool = typer.Option(False, "--hard", help="Simulated preemptions send SIGKILL (no checkpoint) instead of SIGTERM."),
    seed: Optional[int] = typer.Option(None, "--seed", callback=flags.count(0, 2**63 - 1), help="Seed for when simulated preemptions happen (default 0)."),
    restart_seconds: Optional[float] = typer.Option(None, "--restart-seconds", callback=flags.seconds(positive=False), help="Local backend: wait before restarting after a preemption (default 3)."),
    poll_seconds: Optional[float] = typer.Option(None, "--poll-seconds", callback=flags.seconds(positive=True), help="How often to poll the backend while watching (default: the backend's, 1 s locally)."),
) -> None:
    """Plan, record the estimate, launch, and watch the job to the end (ledger: estimate vs actual)."""
    from orchestrator import jobs, watch
    from contract.spec import load_spec

    # A dry run's stdout is the backend's description alone (a task YAML can be piped to a file).
    console = _console(stderr=dry_run)
    job_spec = load_spec(spec)
    jobs.check_training_input(job_spec)  # a node that would exit 2 is never started
    if simulate_preemptions is not None and simulate_preemptions < 0:
        raise jobs.JobError("--simulate-preemptions must be 0 or more")
    chosen_backend = jobs.make_backend(backend, _state_dir(ctx), simulate_preemptions=simulate_preemptions, hard=hard,
                                       seed=seed, restart_seconds=restart_seconds)
    from orchestrator.calibrate import fitted_calibration

    # The ledger's fit (`spotune calibrate`), as `spotune plan` uses it: the estimate recorded is the one shown.
    plan = jobs.make_job_plan(job_spec, chosen_backend, price_per_hour, fitted_calibration(_state_dir(ctx)))
    chosen = jobs.choose_option(plan, option)
    console.print(phrases([f"[bold]plan[/] {plan.job}: {plan.model_name} {plan.method}, {plan.total_tokens:,} tokens",
                           f"option {chosen.rank} of {len(plan.options)}: {chosen.placement.label()}",
                           f"{chosen.tokens_per_second:,.0f} tokens/s", f"{chosen.expected_hours:.4f} h",
                           f"expected {usd_fine(chosen.expected_cost)}"], console.width), highlight=False)
    _say_left_out(console, plan, chosen, chosen_backend.name)
    if dry_run:
        console.print(f"[bold]dry run[/]: would record job '{job_spec.name}' with the estimate above and submit it "
                      f"to {chosen_backend.name}; nothing written.", highlight=False)
        typer.echo(jobs.dry_run(job_spec, chosen_backend, plan, chosen, _state_dir(ctx)))
        return
    ledger = _options(ctx).ledger()
    submitted = jobs.submit_job(ledger, spec, job_spec, chosen_backend, plan, chosen, _state_dir(ctx))
    console.print(phrases([f"job [bold]{submitted.job_id}[/] submitted to {backend}", f"({submitted.external_id})",
                           f"recorded in {_options(ctx).ledger_label()}"], console.width + len("[bold][/]"), sep=" "),
                  highlight=False)
    if detach:
        console.print(f"watch it with: spotune resume {submitted.job_id}   (or spotune status / logs {submitted.job_id})")
        return
    watcher = watch.Watcher(ledger, submitted.job_id, chosen_backend, submitted.external_id, poll_seconds)
    raise typer.Exit(_watch(console, ctx, ledger, watcher, submitted.job_id))


def _job_rows(ledger: "Ledger", records) -> list[dict]:
    """status's summary of each job: attempts alone give the actual cost (reconcile's own sum)."""
    from orchestrator.quote import money
    from orchestrator.reconcile import is_controller, spend

    rows = []
    for r in records:
        attempts = ledger.attempts(r.id)
        rows.append({"id": r.id, "name": r.name, "status": r.status, "backend": r.backend,
                     "created_at": r.created_at.isoformat().replace("+00:00", "Z"), "attempts": sum(not is_controller(a) for a in attempts),
                     "estimate_cost": float(money(r.estimate.expected_cost)),
                     "actual_cost": float(money(spend(attempts))),
                     "budget": None if r.budget is None else float(r.budget), "failure_reason": r.failure_reason or None})
    return rows


def _sync_live(ctx: typer.Context, ledger: "Ledger", records) -> bool:
    from orchestrator.watch import sync_unsettled

    # Also settles what a killed CLI or an unwritable ledger left open (watch.sync_unsettled); a
    # backend that cannot answer leaves what the ledger last knew.
    return sync_unsettled(ledger, _state_dir(ctx), records) > 0


def status(ctx: typer.Context,
           job: Optional[str] = typer.Argument(None, help="Job id (or a unique prefix); all jobs when left out."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON (docs/json.md): the jobs, or one job as `ledger JOB --json` has it.")) -> None:
    """A table of jobs, or one job's detail (synced with its backend first)."""
    from datetime import datetime, timezone

    from orchestrator import report

    ledger = _existing_ledger(ctx, job)
    label = _options(ctx).ledger_label()
    console = _console()
    if job is not None:
        record = ledger.get_job(job)
        _sync_live(ctx, ledger, [record])
        if as_json:
            entry = report.build_entries(ledger, [ledger.get_job(record.id)], datetime.now(timezone.utc))[0]
            typer.echo(json.dumps({"ledger": label, "job": entry.to_json()}, indent=2))
            return
        render_job(console, ledger, record.id)
        _say_ledger(console, ctx)
        return
    records = ledger.list_jobs() if ledger is not None else []
    if ledger is not None and _sync_live(ctx, ledger, records):
        records = ledger.list_jobs()
    rows = _job_rows(ledger, records) if ledger is not None else []
    if as_json:
        typer.echo(json.dumps({"ledger": label, "jobs": rows}, indent=2))
        return
    if not rows:
        where = f"{label}: not created yet" if ledger is None else label
        console.print(f"no jobs yet ({where}); start one with: spotune launch SPEC.yaml", highlight=False)
        return
    from rich import box
    from rich.table import Table

    from orchestrator.format import usd

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("job", "status", "backend", "created", "attempts", "estimate", "actual"):
        table.add_column(column, justify="right" if column in ("attempts", "estimate", "actual") else "left",
                         no_wrap=column != "job", overflow="fold")
    for r in rows:
        table.add_row(r["id"], r["status"], r["backend"], r["created_at"][:16].replace("T", " "), str(r["attempts"]),
                      usd(r["estimate_cost"]), usd(r["actual_cost"]))
    console.print(table)
    _say_ledger(console, ctx)


def logs(ctx: typer.Context,
         job: str = typer.Argument(..., help="Job id (or a unique prefix)."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
         as_json: bool = typer.Option(False, "--json", help="Print the recipe's events (events.jsonl), one JSON object a line (docs/json.md).")) -> None:
    """The recipe's output, attempt by attempt (or its events, with --json)."""
    from orchestrator.jobs import backend_errors
    from orchestrator.watch import attach

    ledger = _existing_ledger(ctx, job)
    watcher = attach(ledger, job, state_dir=_state_dir(ctx))
    typer.echo(f"{watcher.job_id} ({_options(ctx).ledger_label()})", err=True)
    try:
        if as_json:
            _events(watcher, follow)
            return
        with backend_errors(watcher.job_id):
            for line in watcher.backend.logs(watcher.external_id, follow=follow):
                typer.echo(line)
    except KeyboardInterrupt:
        raise typer.Exit(130)


def _events(watcher, follow: bool) -> None:
    """The job's events.jsonl as the backend mirrors it here, from the start; with follow, until the job ends."""
    import time

    from contract.backend import TERMINAL_STATES
    from contract.events import parse_line, read_new_lines

    offset = 0
    while True:
        observation = watcher.sync()
        if observation.events_path is not None:
            lines, offset = read_new_lines(observation.events_path, offset)
            for _, raw in lines:
                event = parse_line(raw)
                if event is not None:
                    typer.echo(json.dumps(event))
        if not follow or observation.state in TERMINAL_STATES:
            return
        time.sleep(watcher.poll_seconds)


def cancel(ctx: typer.Context,
           job: str = typer.Argument(..., help="Job id (or a unique prefix)."),
           wait: float = typer.Option(300.0, "--wait", callback=flags.seconds(positive=False), help="Seconds to wait for the checkpoint and stop.")) -> None:
    """Stop a job gracefully: the recipe checkpoints first, then the job is marked cancelled."""
    from orchestrator.ledger_tables import TERMINAL_STATUSES
    from orchestrator.report_checkpoints import existing_checkpoints
    from orchestrator.watch import attach, cancel_job

    console, ledger = _console(), _existing_ledger(ctx, job)
    record = ledger.get_job(job)
    if record.status in TERMINAL_STATUSES:
        console.print(f"job {record.id} already ended: {record.status}")
        return
    final = cancel_job(ledger, record.id, wait_seconds=wait, state_dir=_state_dir(ctx))
    if final.job.status not in TERMINAL_STATUSES:
        console.print(f"job {record.id} is still stopping after {wait:.0f} s (status {final.job.status}); "
                      f"check again with: spotune status {record.id}")
        raise typer.Exit(1)
    if final.job.external_id is not None:  # None: its launch was cut short before anything started
        attach(ledger, record.id, state_dir=_state_dir(ctx)).sync()  # the final checkpoint's event, ingested now
    saved = existing_checkpoints(final.job, ledger.checkpoints(record.id), ledger.run_events(record.id))
    kept = f"; resume it from step {saved[-1].step} with: spotune resume {record.id}" if saved else ""
    console.print(f"job {record.id}: {final.job.status}" + (f" ({final.job.failure_reason})" if final.job.failure_reason else "")
                  + kept, highlight=False)
    _say_ledger(console, ctx)


def resume(ctx: typer.Context,
           job: str = typer.Argument(..., help="Job id (or a unique prefix)."),
           budget: Optional[float] = typer.Option(None, "--budget", callback=flags.budget, metavar="USD",
                                                  help="Continue a job stopped over budget (or cancelled) with this total budget; recorded in the ledger."),
           poll_seconds: Optional[float] = typer.Option(None, "--poll-seconds", callback=flags.seconds(positive=True), help="How often to poll the backend (default: the backend's, 1 s locally).")) -> None:
    """Re-attach to a job and watch it to the end; a cancelled or over-budget job continues from its last checkpoint."""
    from orchestrator.resume import CONTINUABLE, continue_stopped
    from orchestrator.watch import reattach

    console, ledger = _console(), _existing_ledger(ctx, job)
    record = ledger.get_job(job)
    new_budget = None if budget is None else Decimal(str(budget))
    if record.status in CONTINUABLE:
        went_on = continue_stopped(ledger, record.id, new_budget, _state_dir(ctx), poll_seconds)
        where = f"from the checkpoint at step {went_on.from_step}" if went_on.from_step is not None else \
            "from the start (no checkpoint was kept)"
        raised = "" if new_budget is None or new_budget == went_on.old_budget else \
            f", budget {usd_exact(new_budget)} (was {usd_exact(went_on.old_budget) if went_on.old_budget is not None else 'none'})"
        console.print(phrases([f"continuing [bold]{record.id}[/] {where}", f"{usd_fine(went_on.spent)} spent so far{raised}"],
                              console.width), highlight=False)
        watcher = went_on.watcher
    else:
        if budget is not None:
            raise UserError(f"--budget continues a cancelled or over-budget job; {record.id} is {record.status}")
        # A launch cut short is completed, a dead supervisor replaced (watch.reattach says which).
        watcher = reattach(ledger, job, poll_seconds=poll_seconds, state_dir=_state_dir(ctx),
                           say=lambda line: console.print(line, markup=False, highlight=False))
        console.print(f"re-attached to [bold]{watcher.job_id}[/] on {record.backend} ({watcher.external_id})", highlight=False)
    raise typer.Exit(_watch(console, ctx, ledger, watcher, watcher.job_id))


def register(app: typer.Typer) -> None:
    app.command("launch")(launch)
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("cancel")(cancel)
    app.command("resume")(resume)
