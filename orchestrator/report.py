"""The ledger report: what every job cost against its estimate, and why (price, throughput,
preemption), as JSON, CSV and rich tables; one job's attempts timeline, checkpoints and variance
story. `spotune ledger` prints it, `spotune launch | resume | status JOB` end with one job's
entry; the PNG is in `report_plot.py`.
"""
from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Optional

from orchestrator.format import per_hour, placement_label, size, usd, usd_signed

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


def to_json_text(entries: list[Entry], report: dict) -> str:
    """`spotune ledger --json`: one object, the jobs and the totals."""
    return json.dumps({"jobs": [e.to_json() for e in entries], "totals": report}, indent=2)


def to_csv_text(entries: list[Entry]) -> str:
    """`spotune ledger --csv`: a header and one row per job."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for e in entries:
        writer.writerow(e.csv_row())
    return buffer.getvalue()


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
        table.add_row(e.job.id, e.job.status, usd(j["estimate"]["cost"]), usd(j["actual"]["cost"]),
                      usd_signed(v["total"]), usd_signed(v["price"]), usd_signed(v["throughput"]),
                      usd_signed(v["preemption"]))
    v = report["variance"]
    table.add_section()
    table.add_row(f"total, {report['jobs']} job{'s' if report['jobs'] != 1 else ''}", "", usd(report["estimate"]),
                  usd(report["actual"]), usd_signed(v["total"]), usd_signed(v["price"]), usd_signed(v["throughput"]),
                  usd_signed(v["preemption"]))
    console.print(table)
    for group in GROUPS:
        t = _table(f"By {group}")
        t.add_column(group)
        for col in ("jobs", "estimate", "actual", "variance"):
            t.add_column(col, justify="right")
        for row in report[f"by_{group}"]:
            t.add_row(str(row[group]), str(row["jobs"]), usd(row["estimate"]), usd(row["actual"]),
                      usd_signed(row["variance"]))
        console.print()
        console.print(t)
    console.print("Estimates count where a job was planned to run; actual spend where each attempt ran.")


def _estimate_vs_actual(e: Entry):
    """The job's headline figures side by side: what was planned, what happened."""
    est, rec = e.job.estimate, e.rec
    table = _table("Estimate vs actual")
    for column in ("", "estimate", "actual"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("where", placement_label(est, with_price=False),
                  ", ".join(sorted({placement_label(a, with_price=False) for a in e.attempts})) or "-")
    table.add_row("$/h", f"${est.price_per_hour:,.4f}",
                  ", ".join(sorted({f"${a.price_per_hour:,.4f}" for a in e.attempts})) or "-")
    table.add_row("tokens", f"{est.total_tokens:,}", f"{rec.tokens:,}" if rec.tokens is not None else "-")
    table.add_row("tokens/s", f"{est.tokens_per_second:,.0f}",
                  f"{rec.tokens_per_second:,.0f}" if rec.tokens_per_second is not None else "-")
    table.add_row("hours", f"{rec.estimate_hours:.4f}", f"{float(rec.actual_hours):.4f}")
    table.add_row("attempts / preemptions", "1", f"{len(rec.attempts)} / {rec.preemptions}")
    table.add_row("cost", usd(rec.estimate_cost), usd(rec.actual_cost) + (" so far" if rec.open else ""))
    return table


def _place_in_words(a) -> str:
    """An attempt or estimate's place in full words: aws/us-east-1 1xA10G on-demand."""
    return f"{a.provider}/{a.region} {a.gpu_count}x{a.gpu} {'spot' if a.spot else 'on-demand'}"


def render_job(console, e: Entry) -> None:
    from rich.markup import escape

    job, est, rec = e.job, e.job.estimate, e.rec
    console.print(f"[bold]{job.id}[/]  {job.status} on {job.backend}" + (f" ({escape(job.external_id)})" if job.external_id else ""))
    console.print(f"{escape(job.model)} {job.method}, spec sha256 {job.spec_hash[:12]}, submitted {job.created_at:%Y-%m-%d %H:%M} UTC")
    if job.failure_reason:
        console.print(f"reason: {escape(job.failure_reason)}")
    console.print(f"planned: {_place_in_words(est)} "
                  f"at {per_hour(est.price_per_hour)}, {est.tokens_per_second:,.0f} tokens/s, {est.hours:.3f} h compute "
                  f"+ {est.preemption_overhead_hours:.3f} h preemption = {usd(rec.estimate_cost)} "
                  f"(option {est.chosen_rank} of {len(est.plan.get('options', []))}, prices {escape(est.catalog_snapshot)})")
    console.print()
    console.print(_estimate_vs_actual(e))
    console.print("[bold]Attempts[/] (UTC)" if e.attempts else "no attempts recorded yet")
    for a, c in zip(e.attempts, rec.attempts):
        end = "now" if a.ended_at is None else f"{a.ended_at:%H:%M:%S}"
        console.print(f"  {a.n}  {a.started_at:%Y-%m-%d %H:%M:%S} -> {end}  {_place_in_words(a)}")
        facts = [f"{float(c.hours):.3f} h x {per_hour(a.price_per_hour)} = {usd(_cents(c.cost))}", a.end_reason or "running"]
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
            cps.add_row(str(c.attempt), str(c.step), f"{c.time:%H:%M:%S}", size(c.bytes),
                        "-" if c.seconds is None else f"{c.seconds:.1f}", "yes" if c.verified else "no", escape(c.path))
        console.print()
        console.print(cps)
    console.print()
    console.print(escape(rec.story()))


def print_job(console, ledger: "Ledger", job_id: str, now: Optional[datetime] = None) -> None:
    """One job's entry, read from the ledger: what `spotune ledger JOB` shows."""
    job = ledger.get_job(job_id)
    render_job(console, build_entries(ledger, [job], now or datetime.now(timezone.utc))[0])
