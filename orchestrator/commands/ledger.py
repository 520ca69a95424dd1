"""`spotune ledger [JOB]`: what every job cost against its estimate, and why (price, throughput,
preemption); one job's attempts timeline, checkpoints and variance story. `--json`, `--csv` and
`--plot FILE` give the same figures to machines, spreadsheets and people.
"""
from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from orchestrator.errors import UserError

if TYPE_CHECKING:
    from orchestrator.ledger import AttemptRecord, JobRecord, Ledger
    from orchestrator.reconcile import Reconciliation

SPLIT = ("price", "throughput", "preemption")
GROUPS = ("provider", "gpu", "method", "month")
CSV_COLUMNS = ("id", "name", "status", "backend", "provider", "gpu", "method", "created_at", "estimate_cost",
               "actual_cost", "variance", "price", "throughput", "preemption", "estimate_hours", "actual_hours",
               "tokens", "tokens_per_second")


def _cents(amount: Decimal) -> float:
    from orchestrator.quote import money

    return float(money(amount))


def _iso(when: Optional[datetime]) -> Optional[str]:
    return None if when is None else when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class Entry:
    """One job with its attempts and reconciliation, and its JSON form."""

    def __init__(self, job: "JobRecord", attempts: list["AttemptRecord"], checkpoints: list, rec: "Reconciliation"):
        self.job, self.attempts, self.checkpoints, self.rec = job, attempts, checkpoints, rec

    def to_json(self) -> dict:
        job, rec, est = self.job, self.rec, self.job.estimate
        costs = {c.n: c for c in rec.attempts}
        return {
            "id": job.id, "name": job.name, "status": job.status, "backend": job.backend, "method": job.method,
            "created_at": _iso(job.created_at),
            "estimate": {"cost": _cents(rec.estimate_cost), "hours": round(est.expected_hours, 4),
                         "tokens_per_second": round(est.tokens_per_second, 1), "provider": est.provider,
                         "gpu": est.gpu, "gpu_count": est.gpu_count, "spot": est.spot,
                         "price_per_hour": float(est.price_per_hour)},
            "actual": {"cost": _cents(rec.actual_cost), "hours": round(float(rec.actual_hours), 4), "tokens": rec.tokens,
                       "tokens_per_second": None if rec.tokens_per_second is None else round(rec.tokens_per_second, 1)},
            "variance": {"total": _cents(rec.variance), **{part: _cents(getattr(rec, part)) for part in SPLIT}},
            "story": rec.story(),
            "attempts": [{"n": a.n, "provider": a.provider, "region": a.region, "gpu": a.gpu, "gpu_count": a.gpu_count,
                          "spot": a.spot, "price_per_hour": float(a.price_per_hour), "started_at": _iso(a.started_at),
                          "ended_at": _iso(a.ended_at), "end_reason": a.end_reason,
                          "resumed_from_step": a.resumed_from_step, "tokens": a.tokens,
                          "hours": round(float(costs[a.n].hours), 4), "cost": _cents(costs[a.n].cost)}
                         for a in self.attempts],
        }

    def csv_row(self) -> dict:
        j = self.to_json()
        return {"id": j["id"], "name": j["name"], "status": j["status"], "backend": j["backend"],
                "provider": j["estimate"]["provider"], "gpu": j["estimate"]["gpu"], "method": j["method"],
                "created_at": j["created_at"], "estimate_cost": j["estimate"]["cost"], "actual_cost": j["actual"]["cost"],
                "variance": j["variance"]["total"], **{p: j["variance"][p] for p in SPLIT},
                "estimate_hours": j["estimate"]["hours"], "actual_hours": j["actual"]["hours"],
                "tokens": j["actual"]["tokens"], "tokens_per_second": j["actual"]["tokens_per_second"]}


def build_entries(ledger: "Ledger", jobs: list["JobRecord"], now: datetime) -> list[Entry]:
    from orchestrator.reconcile import reconcile

    entries = []
    for job in jobs:
        attempts, checkpoints = ledger.attempts(job.id), ledger.checkpoints(job.id)
        rec = reconcile(job, attempts, checkpoints, ledger.samples(job.id), ledger.run_events(job.id), now=now)
        entries.append(Entry(job, attempts, checkpoints, rec))
    return entries


def totals(entries: list[Entry]) -> dict:
    """Sums over jobs, and by provider, GPU, method and month. Estimates count where the job was
    planned to run, actual spend where each attempt really ran (a recovery may change provider)."""
    zero = Decimal(0)
    overall = {"jobs": len(entries), "estimate": zero, "actual": zero, **{p: zero for p in SPLIT}}
    groups: dict[str, dict[str, dict]] = {g: defaultdict(lambda: {"jobs": 0, "estimate": zero, "actual": zero}) for g in GROUPS}
    for e in entries:
        rec, est, job = e.rec, e.job.estimate, e.job
        overall["estimate"] += rec.estimate_cost
        overall["actual"] += rec.actual_cost
        for part in SPLIT:
            overall[part] += getattr(rec, part)
        planned = {"provider": est.provider, "gpu": est.gpu, "method": job.method, "month": f"{job.created_at:%Y-%m}"}
        for group, key in planned.items():
            groups[group][key]["jobs"] += 1
            groups[group][key]["estimate"] += rec.estimate_cost
        groups["method"][job.method]["actual"] += rec.actual_cost
        groups["month"][f"{job.created_at:%Y-%m}"]["actual"] += rec.actual_cost
        for attempt, cost in zip(e.attempts, rec.attempts):
            groups["provider"][attempt.provider]["actual"] += cost.cost
            groups["gpu"][attempt.gpu]["actual"] += cost.cost
    out = {"jobs": overall["jobs"], "estimate": _cents(overall["estimate"]), "actual": _cents(overall["actual"]),
           "variance": {"total": _cents(overall["actual"] - overall["estimate"]), **{p: _cents(overall[p]) for p in SPLIT}}}
    for group in GROUPS:
        rows = []
        for key, g in sorted(groups[group].items()):
            estimate, actual = _cents(g["estimate"]), _cents(g["actual"])
            rows.append({group: key, "jobs": g["jobs"], "estimate": estimate, "actual": actual,
                         "variance": round(actual - estimate, 2)})
        out[f"by_{group}"] = rows
    return out


def _money(x: float | Decimal) -> str:
    return f"-${abs(x):,.2f}" if x < 0 else f"${x:,.2f}"


def _signed(x: float | Decimal) -> str:
    return f"{'-' if x < 0 else '+'}${abs(x):,.2f}"


def _hours(h: float | Decimal) -> str:
    return f"{float(h):.2f} h"


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return "-"


def _table(title: Optional[str] = None, **kw):
    from rich import box
    from rich.table import Table

    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                 collapse_padding=True, **kw)


def render_all(console, entries: list[Entry], report: dict) -> None:
    table = _table("Jobs: estimate vs actual, and the variance split")
    # Money never wraps or truncates; on a narrow terminal the job id folds instead.
    table.add_column("job", overflow="fold", min_width=14)
    table.add_column("status", no_wrap=True)
    for col in ("estimate", "actual", "variance", "price", "thruput", "preempt"):
        table.add_column(col, justify="right", no_wrap=True)
    for e in entries:
        j = e.to_json()
        v = j["variance"]
        table.add_row(e.job.id, e.job.status, _money(j["estimate"]["cost"]), _money(j["actual"]["cost"]),
                      _signed(v["total"]), _signed(v["price"]), _signed(v["throughput"]), _signed(v["preemption"]))
    v = report["variance"]
    table.add_section()
    table.add_row(f"total, {report['jobs']} job{'s' if report['jobs'] != 1 else ''}", "", _money(report["estimate"]),
                  _money(report["actual"]), _signed(v["total"]), _signed(v["price"]), _signed(v["throughput"]),
                  _signed(v["preemption"]))
    console.print(table)
    for group in GROUPS:
        t = _table(f"By {group}")
        t.add_column(group)
        for col in ("jobs", "estimate", "actual", "variance"):
            t.add_column(col, justify="right")
        for row in report[f"by_{group}"]:
            t.add_row(str(row[group]), str(row["jobs"]), _money(row["estimate"]), _money(row["actual"]), _signed(row["variance"]))
        console.print()
        console.print(t)
    console.print("Estimates count where a job was planned to run; actual spend where each attempt ran.")


def _place(x) -> str:
    return f"{x.provider}/{x.region} {x.gpu_count}x{x.gpu}{' spot' if x.spot else ''}"


def _estimate_vs_actual(e: Entry):
    """The job's headline figures side by side: what was planned, what happened."""
    est, rec = e.job.estimate, e.rec
    table = _table("Estimate vs actual")
    for column in ("", "estimate", "actual"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("where", _place(est), ", ".join(sorted({_place(a) for a in e.attempts})) or "-")
    table.add_row("$/h", f"${est.price_per_hour:,.4f}",
                  ", ".join(sorted({f"${a.price_per_hour:,.4f}" for a in e.attempts})) or "-")
    table.add_row("tokens", f"{est.total_tokens:,}", f"{rec.tokens:,}" if rec.tokens is not None else "-")
    table.add_row("tokens/s", f"{est.tokens_per_second:,.0f}",
                  f"{rec.tokens_per_second:,.0f}" if rec.tokens_per_second is not None else "-")
    table.add_row("hours", f"{rec.estimate_hours:.4f}", f"{float(rec.actual_hours):.4f}")
    table.add_row("attempts / preemptions", "1", f"{len(rec.attempts)} / {rec.preemptions}")
    table.add_row("cost", _money(rec.estimate_cost), _money(rec.actual_cost) + (" so far" if rec.open else ""))
    return table


def render_job(console, e: Entry) -> None:
    from rich.markup import escape

    job, est, rec = e.job, e.job.estimate, e.rec
    console.print(f"[bold]{job.id}[/]  {job.status} on {job.backend}" + (f" ({escape(job.external_id)})" if job.external_id else ""))
    console.print(f"{escape(job.model)} {job.method}, spec sha256 {job.spec_hash[:12]}, submitted {job.created_at:%Y-%m-%d %H:%M} UTC")
    if job.failure_reason:
        console.print(f"reason: {escape(job.failure_reason)}")
    console.print(f"planned: {est.provider}/{est.region} {est.gpu_count}x{est.gpu} {'spot' if est.spot else 'on-demand'} "
                  f"at ${est.price_per_hour:,.4f}/h, {est.tokens_per_second:,.0f} tokens/s, {est.hours:.3f} h compute "
                  f"+ {est.preemption_overhead_hours:.3f} h preemption = {_money(rec.estimate_cost)} "
                  f"(option {est.chosen_rank} of {len(est.plan.get('options', []))}, prices {escape(est.catalog_snapshot)})")
    console.print()
    console.print(_estimate_vs_actual(e))
    console.print("[bold]Attempts[/] (UTC)" if e.attempts else "no attempts recorded yet")
    for a, c in zip(e.attempts, rec.attempts):
        end = "now" if a.ended_at is None else f"{a.ended_at:%H:%M:%S}"
        console.print(f"  {a.n}  {a.started_at:%Y-%m-%d %H:%M:%S} -> {end}  {a.provider}/{a.region} {a.gpu_count}x{a.gpu}"
                      f" {'spot' if a.spot else 'on-demand'}")
        facts = [f"{float(c.hours):.3f} h x ${a.price_per_hour:,.4f}/h = {_money(_cents(c.cost))}", a.end_reason or "running"]
        if a.resumed_from_step is not None:
            facts.append(f"resumed from step {a.resumed_from_step}")
        if c.lost_hours:
            parts = [f"{float(h):.3f} h {name}" for name, h in (("restart", c.restart_hours), ("rework", c.rework_hours)) if h]
            facts.append(f"lost {float(c.lost_hours):.3f} h ({', '.join(parts)})")
        if a.tokens is not None:
            facts.append(f"{a.tokens:,} tokens")
        if a.detail:
            facts.append(escape(a.detail))
        console.print("     " + "; ".join(facts))
    if e.checkpoints:
        cps = _table("Checkpoints")
        for col in ("attempt", "step", "written", "size", "save s", "verified", "path"):
            cps.add_column(col, justify="right" if col in ("step", "size", "save s") else "left",
                           overflow="fold" if col == "path" else "ellipsis")
        for c in e.checkpoints:
            cps.add_row(str(c.attempt), str(c.step), f"{c.time:%H:%M:%S}", _size(c.bytes),
                        "-" if c.seconds is None else f"{c.seconds:.1f}", "yes" if c.verified else "no", escape(c.path))
        console.print()
        console.print(cps)
    console.print()
    console.print(escape(rec.story()))


def write_plot(entries: list[Entry], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not entries:
        raise UserError("no jobs in the ledger to plot")
    labels = [e.job.id for e in entries]
    xs = range(len(entries))
    width = 0.38
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(6.0, 1.1 * len(entries) + 3), 7),
                                      gridspec_kw={"height_ratios": [3, 2]})
    estimate = [float(e.rec.estimate_cost) for e in entries]
    actual = [float(e.rec.actual_cost) for e in entries]
    top.bar([x - width / 2 for x in xs], estimate, width, label="estimate", color="#9db4d0")
    top.bar([x + width / 2 for x in xs], actual, width, label="actual", color="#2f5d8a")
    for x, est_value, value in zip(xs, estimate, actual):
        top.annotate(f"${est_value:,.2f}", (x - width / 2, est_value), ha="center", va="bottom", fontsize=8)
        top.annotate(f"${value:,.2f}", (x + width / 2, value), ha="center", va="bottom", fontsize=8)
    top.set_ylabel("USD")
    top.set_title("Fine-tuning spend: estimate vs actual per job")
    top.legend(loc="upper left")
    colors = {"price": "#d9822b", "throughput": "#6a994e", "preemption": "#bc4749"}
    up, down = [0.0] * len(entries), [0.0] * len(entries)
    for part in SPLIT:
        values = [float(getattr(e.rec, part)) for e in entries]
        bases = [u if v >= 0 else d for v, u, d in zip(values, up, down)]
        bottom.bar(list(xs), values, 0.6, bottom=bases, label=part, color=colors[part])
        up = [u + max(v, 0) for u, v in zip(up, values)]
        down = [d + min(v, 0) for d, v in zip(down, values)]
    bottom.scatter(list(xs), [float(e.rec.variance) for e in entries], marker="D", color="black", zorder=3,
                   label="net variance")
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_ylabel("variance, USD")
    bottom.set_title("Variance (actual - estimate) split", fontsize=10)
    bottom.legend(loc="best", fontsize=8)
    bottom.set_xticks(list(xs))
    bottom.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _open_ledger() -> Optional["Ledger"]:
    """The ledger, or None when the default SQLite file does not exist yet (reading creates nothing)."""
    from orchestrator.cli import Globals
    from orchestrator.ledger import Ledger
    from orchestrator.settings import db_url, state_dir

    url = db_url(Globals.db, state_dir(Globals.state_dir))
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return None
    return Ledger(url)


def ledger(
    job: Optional[str] = typer.Argument(None, help="Job id (or a unique prefix): its attempts, checkpoints and variance story."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: jobs with estimate, actual, variance split, attempts; totals."),
    as_csv: bool = typer.Option(False, "--csv", help="Print one CSV row per job."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of estimate vs actual per job, with the variance split."),
) -> None:
    """What each job cost against its estimate, and why: price, throughput, preemption."""
    from orchestrator.commands import make_console

    if as_json and as_csv:
        raise UserError("--json and --csv are alternatives; give one")
    if plot is not None and not plot.parent.exists():
        raise UserError(f"cannot write plot: directory {plot.parent} does not exist")
    opened = _open_ledger()
    if opened is None and job is not None:
        raise UserError(f"no job matching {job!r}: the ledger is empty")
    now = datetime.now(timezone.utc)
    with (opened or _Empty()) as led:
        jobs = [led.get_job(job)] if job is not None else led.list_jobs()
        entries = build_entries(led, jobs, now)
    if plot is not None:
        write_plot(entries, plot)
    report = totals(entries)
    if as_json:
        typer.echo(json.dumps({"jobs": [e.to_json() for e in entries], "totals": report}, indent=2))
        return
    if as_csv:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for e in entries:
            writer.writerow(e.csv_row())
        typer.echo(buffer.getvalue(), nl=False)
        return
    console = make_console()
    if job is not None:
        render_job(console, entries[0])
    elif not entries:
        console.print("no jobs in the ledger yet")
    else:
        render_all(console, entries, report)
    if plot is not None:
        console.print(f"plot written to {plot}")


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
