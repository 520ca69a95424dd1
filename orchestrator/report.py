"""The ledger report: what every job cost against its estimate, and why (price, throughput,
preemption), as JSON, CSV and rich tables; one job's attempts timeline, checkpoints and variance
story. `spotune ledger` prints it, `spotune launch | resume | status JOB` end with one job's
entry; the PNG is in `report_plot.py`, the HTML page in `report_html.py`.

Figures that are shown together add up as shown: each attempt's cost is rounded so that the
attempts add up to the job's actual cost (`format.cents_that_add_up`), totals are sums of the rows
shown, and percentages come from the exact amounts, never from rounded cents.
"""
from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Optional

from orchestrator.quote import money_json
from orchestrator.report_checkpoints import checkpoint_table, existing_checkpoints
from orchestrator.format import cents_that_add_up, per_hour, phrases, placement_label, usd, usd_exact, usd_signed

if TYPE_CHECKING:
    from orchestrator.ledger import AttemptRecord, CheckpointRecord, JobRecord, Ledger, RunEventRecord
    from orchestrator.reconcile import Reconciliation

SPLIT = ("price", "throughput", "preemption")
# The fourth part of the variance: the backend's jobs controller (SkyPilot), which no estimate plans.
CONTROLLER = "controller"
GROUPS = ("provider", "gpu", "method", "month")
CSV_COLUMNS = ("id", "name", "status", "backend", "provider", "gpu", "method", "created_at", "estimate_cost",
               "actual_cost", "variance", "price", "throughput", "preemption", CONTROLLER, "estimate_hours", "actual_hours",
               "tokens", "tokens_per_second")


def _cents(amount: Decimal) -> float:
    from orchestrator.quote import money

    return float(money(amount))


def _iso(when: Optional[datetime]) -> Optional[str]:
    return None if when is None else when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _percent(new: Decimal, old: Decimal) -> Optional[float]:
    """(new - old) / old in percent, from the exact amounts; None when old is zero."""
    return None if not old else round(float((Decimal(new) - Decimal(old)) / Decimal(old) * 100), 4)


def _execution(record) -> dict:
    """The execution config an estimate planned or an attempt ran (None where not known)."""
    from orchestrator.ledger_tables import EXECUTION_COLUMNS

    return {name: getattr(record, name) for name in EXECUTION_COLUMNS}


def _execution_text(record) -> str:
    """micro-batch 4 x 8, checkpointing off, sdpa, bfloat16 (planned and ran, side by side)."""
    if record.micro_batch is None:
        return "-"
    return (f"micro-batch {record.micro_batch} x {record.grad_accum}, checkpointing "
            f"{'on' if record.gradient_checkpointing else 'off'}, {record.attention}, {record.dtype}")


class Entry:
    """One job with its attempts and reconciliation, and its JSON form."""

    def __init__(self, job: "JobRecord", attempts: list["AttemptRecord"], checkpoints: list, rec: "Reconciliation",
                 budget_changes: list = (), samples: list = (), run_events: list = ()):
        from orchestrator.reconcile import is_controller

        self.deviations: dict[int, list[dict]] = defaultdict(list)   # attempt -> its `deviation` events
        for ev in run_events:
            if ev.event == "deviation":
                self.deviations[ev.attempt].append({k: ev.payload.get(k) for k in ("kind", "reason", "planned", "running")})

        # Attempts at training, and the backend's own lines (SkyPilot's jobs controller) apart.
        self.controller = [a for a in attempts if is_controller(a)]
        attempts = [a for a in attempts if not is_controller(a)]
        self.job, self.attempts, self.checkpoints, self.rec = job, attempts, checkpoints, rec
        self.budget_changes, self.samples = list(budget_changes), list(samples)
        # Rounded so that they add up to the actual cost as shown, the controller's share included.
        parts = [c.cost for c in rec.attempts] + ([rec.controller_cost_exact] if self.controller else [])
        cents = cents_that_add_up(parts, rec.actual_cost) if parts else []
        self.attempt_cents = cents[:len(rec.attempts)]
        self.controller_cents = cents[-1] if self.controller else Decimal(0)

    def controller_json(self) -> Optional[dict]:
        """The jobs controller's line: where it ran, its hours, price and cost, and how it was priced."""
        if not self.controller:
            return None
        c = self.controller[-1]
        return {"provider": c.provider, "region": c.region, "instance_type": c.instance_type,
                "price_per_hour": money_json(c.price_per_hour), "started_at": _iso(c.started_at), "ended_at": _iso(c.ended_at),
                "hours": round(float(self.rec.controller_hours), 4), "cost": money_json(self.rec.exact.controller),
                "cost_exact": money_json(self.rec.exact.controller), "detail": c.detail}

    @property
    def variance_percent(self) -> Optional[float]:
        return _percent(self.rec.exact.actual, self.rec.exact.estimate)

    def cents(self) -> dict:
        """The money a table row shows, in cents that add up (reconcile's split); --json has it exact."""
        rec = self.rec
        return {"estimate": {"cost": rec.estimate_cost}, "actual": {"cost": rec.actual_cost},
                "variance": {"total": rec.variance, **{part: getattr(rec, part) for part in SPLIT},
                             CONTROLLER: rec.controller}}

    def to_json(self) -> dict:
        """Every money field is an exact Decimal string (quote.money_json): the estimate as planned,
        each attempt's billed micro-dollars, actual = their sum, variance parts that add up to it."""
        job, rec, est, exact = self.job, self.rec, self.job.estimate, self.rec.exact
        costs = {c.n: c for c in rec.attempts}
        return {
            "id": job.id, "name": job.name, "status": job.status, "backend": job.backend, "method": job.method,
            "model": job.model, "created_at": _iso(job.created_at), "failure_reason": job.failure_reason or None,
            "budget": money_json(job.budget),
            "budget_changes": [{"time": _iso(b.time), "old_budget": money_json(b.old_budget),
                                "new_budget": money_json(b.new_budget),
                                "spent": money_json(b.spent), "reason": b.reason} for b in self.budget_changes],
            "estimate": {"cost": money_json(exact.estimate), "cost_exact": money_json(exact.estimate),
                         "hours": round(est.expected_hours, 4),
                         "tokens_per_second": round(est.tokens_per_second, 1), "provider": est.provider,
                         "region": est.region, "gpu": est.gpu, "gpu_count": est.gpu_count, "spot": est.spot,
                         "price_per_hour": money_json(est.price_per_hour), "tokens": est.total_tokens,
                         "option": est.chosen_rank, "catalog_snapshot": est.catalog_snapshot, **_execution(est)},
            "actual": {"cost": money_json(exact.actual), "cost_exact": money_json(exact.actual),
                       "hours": round(float(rec.actual_hours), 4), "tokens": rec.tokens,
                       "tokens_per_second": None if rec.tokens_per_second is None else round(rec.tokens_per_second, 1),
                       "open": rec.open},
            "variance": {"total": money_json(exact.variance), **{part: money_json(getattr(exact, part)) for part in SPLIT},
                         CONTROLLER: money_json(exact.controller), "percent": self.variance_percent},
            CONTROLLER: self.controller_json(),
            "story": rec.story(),
            "attempts": [{"n": a.n, "provider": a.provider, "region": a.region, "gpu": a.gpu, "gpu_count": a.gpu_count,
                          "spot": a.spot, "price_per_hour": money_json(a.price_per_hour), "started_at": _iso(a.started_at),
                          "ended_at": _iso(a.ended_at), "end_reason": a.end_reason, "detail": a.detail,
                          "resumed_from_step": a.resumed_from_step, "tokens": a.tokens,
                          "hours": round(float(costs[a.n].hours), 4), "cost": money_json(costs[a.n].billed),
                          "cost_exact": money_json(costs[a.n].billed),
                          "lost_hours": round(float(costs[a.n].lost_hours), 4),
                          **_execution(a), "deviations": self.deviations.get(a.n, [])}
                         for a in self.attempts],
            "checkpoints": [{"attempt": c.attempt, "step": c.step, "path": c.path, "bytes": c.bytes,
                             "seconds": c.seconds, "verified": c.verified, "time": _iso(c.time)}
                            for c in self.checkpoints],
        }

    def csv_row(self) -> dict:
        j = self.to_json()
        return {"id": j["id"], "name": j["name"], "status": j["status"], "backend": j["backend"],
                "provider": j["estimate"]["provider"], "gpu": j["estimate"]["gpu"], "method": j["method"],
                "created_at": j["created_at"], "estimate_cost": j["estimate"]["cost"], "actual_cost": j["actual"]["cost"],
                "variance": j["variance"]["total"], **{p: j["variance"][p] for p in (*SPLIT, CONTROLLER)},
                "estimate_hours": j["estimate"]["hours"], "actual_hours": j["actual"]["hours"],
                "tokens": j["actual"]["tokens"], "tokens_per_second": j["actual"]["tokens_per_second"]}


def build_entries(ledger: "Ledger", jobs: list["JobRecord"], now: datetime, *, samples: bool = False) -> list[Entry]:
    """Each job's entry; `samples` also reads every progress sample (the HTML report's loss curve)."""
    from orchestrator.reconcile import reconcile

    entries = []
    for job in jobs:
        attempts, checkpoints, events = ledger.attempts(job.id), ledger.checkpoints(job.id), ledger.run_events(job.id)
        job_samples = ledger.samples(job.id)
        rec = reconcile(job, attempts, checkpoints, job_samples, events, now=now)
        entries.append(Entry(job, attempts, existing_checkpoints(job, checkpoints, events), rec,
                             ledger.budget_changes(job.id), job_samples if samples else (), events))
    return entries


def totals(entries: list[Entry]) -> dict:
    """`--json` totals: exact sums of the exact figures the job rows carry (micro-dollar strings), over
    all jobs and by provider, GPU, method and month; percentages from the exact sums. Estimates count
    where the job was planned to run, actual spend where each attempt really ran."""
    zero = Decimal(0)
    parts = (*SPLIT, CONTROLLER)
    overall = {"estimate": zero, "actual": zero, "variance": zero, **{p: zero for p in parts}}
    groups: dict[str, dict[str, dict]] = {g: defaultdict(lambda: {"jobs": 0, "estimate": zero, "actual": zero}) for g in GROUPS}
    for e in entries:
        x, job = e.rec.exact, e.job
        for figure in ("estimate", "actual", "variance", *parts):
            overall[figure] += getattr(x, figure)
        planned = {"provider": job.estimate.provider, "gpu": job.estimate.gpu, "method": job.method,
                   "month": f"{job.created_at:%Y-%m}"}
        for group, key in planned.items():
            groups[group][key]["jobs"] += 1
            groups[group][key]["estimate"] += x.estimate
        groups["method"][job.method]["actual"] += x.actual
        groups["month"][planned["month"]]["actual"] += x.actual
        for attempt, cost in zip(e.attempts, e.rec.attempts):
            groups["provider"][attempt.provider]["actual"] += cost.billed
            groups["gpu"][attempt.gpu]["actual"] += cost.billed
        for line in e.controller[-1:]:
            groups["provider"][line.provider]["actual"] += x.controller
            groups["gpu"]["(jobs controller)"]["actual"] += x.controller
    out = {"jobs": len(entries), "estimate": money_json(overall["estimate"]), "actual": money_json(overall["actual"]),
           "variance": {"total": money_json(overall["variance"]), **{p: money_json(overall[p]) for p in parts},
                        "percent": _percent(overall["actual"], overall["estimate"])}}
    for group in GROUPS:
        out[f"by_{group}"] = [{group: key, "jobs": g["jobs"], "estimate": money_json(g["estimate"]),
                               "actual": money_json(g["actual"]), "variance": money_json(g["actual"] - g["estimate"])}
                              for key, g in sorted(groups[group].items())]
    return out


def _shown_totals(entries: list[Entry]) -> dict:
    """The tables' totals, in cents: sums over jobs, and by provider, GPU, method and month, of the figures the job rows show (so a
    total is the sum of its rows). Estimates count where the job was planned to run, actual spend
    where each attempt really ran (a recovery may change provider)."""
    zero = Decimal(0)
    overall = {"jobs": len(entries), "estimate": zero, "actual": zero, **{p: zero for p in (*SPLIT, CONTROLLER)}}
    exact = {"estimate": zero, "actual": zero}
    groups: dict[str, dict[str, dict]] = {g: defaultdict(lambda: {"jobs": 0, "estimate": zero, "actual": zero}) for g in GROUPS}
    for e in entries:
        rec, est, job = e.rec, e.job.estimate, e.job
        overall["estimate"] += rec.estimate_cost
        overall["actual"] += rec.actual_cost
        exact["estimate"] += Decimal(est.expected_cost)
        exact["actual"] += rec.actual_cost_exact
        for part in (*SPLIT, CONTROLLER):
            overall[part] += getattr(rec, part)
        planned = {"provider": est.provider, "gpu": est.gpu, "method": job.method, "month": f"{job.created_at:%Y-%m}"}
        for group, key in planned.items():
            groups[group][key]["jobs"] += 1
            groups[group][key]["estimate"] += rec.estimate_cost
        groups["method"][job.method]["actual"] += rec.actual_cost
        groups["month"][f"{job.created_at:%Y-%m}"]["actual"] += rec.actual_cost
        for attempt, cents in zip(e.attempts, e.attempt_cents):
            groups["provider"][attempt.provider]["actual"] += cents
            groups["gpu"][attempt.gpu]["actual"] += cents
        for line in e.controller[-1:]:
            groups["provider"][line.provider]["actual"] += e.controller_cents
            groups["gpu"]["(jobs controller)"]["actual"] += e.controller_cents
    out = {"jobs": overall["jobs"], "estimate": float(overall["estimate"]), "actual": float(overall["actual"]),
           "variance": {"total": float(overall["actual"] - overall["estimate"]),
                        **{p: float(overall[p]) for p in (*SPLIT, CONTROLLER)},
                        "percent": _percent(exact["actual"], exact["estimate"])}}
    for group in GROUPS:
        rows = []
        for key, g in sorted(groups[group].items()):
            rows.append({group: key, "jobs": g["jobs"], "estimate": float(g["estimate"]), "actual": float(g["actual"]),
                         "variance": float(g["actual"] - g["estimate"])})
        out[f"by_{group}"] = rows
    return out


def to_json(entries: list[Entry], report: dict, ledger_label: Optional[str] = None) -> dict:
    """`spotune ledger --json`: one object, the jobs and the totals (docs/json.md, `ledger`)."""
    return {"ledger": ledger_label, "jobs": [e.to_json() for e in entries], "totals": report}


def to_json_text(entries: list[Entry], report: dict, ledger_label: Optional[str] = None) -> str:
    return json.dumps(to_json(entries, report, ledger_label), indent=2)


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
    report = _shown_totals(entries)  # the cents the rows show, summed: a total is the sum of its rows
    table = _table("Jobs: estimate vs actual, and the variance split")
    # Money never wraps or truncates. On a narrow terminal the status goes under the job id (which
    # folds if it must), so that every figure keeps its column.
    narrow = console.width < 100
    table.add_column("job", overflow="fold", min_width=14)
    if not narrow:
        table.add_column("status", no_wrap=True)
    with_controller = any(e.controller for e in entries)
    for col in ("estimate", "actual", "variance", "price", "thruput", "preempt", *(("ctrl",) if with_controller else ())):
        table.add_column(col, justify="right", no_wrap=True)
    for e in entries:
        j = e.cents()
        v = j["variance"]
        table.add_row(*((f"{e.job.id}\n  {e.job.status}",) if narrow else (e.job.id, e.job.status)),
                      usd(j["estimate"]["cost"]), usd(j["actual"]["cost"]),
                      usd_signed(v["total"]), usd_signed(v["price"]), usd_signed(v["throughput"]),
                      usd_signed(v["preemption"]), *((usd_signed(v[CONTROLLER]),) if with_controller else ()))
    v = report["variance"]
    table.add_section()
    table.add_row(f"total, {report['jobs']} job{'s' if report['jobs'] != 1 else ''}", *(() if narrow else ("",)),
                  usd(report["estimate"]),
                  usd(report["actual"]), usd_signed(v["total"]), usd_signed(v["price"]), usd_signed(v["throughput"]),
                  usd_signed(v["preemption"]), *((usd_signed(v[CONTROLLER]),) if with_controller else ()))
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
    console.print(phrases(["Estimates count where a job was planned to run;", "actual spend where each attempt ran."],
                          console.width, sep=" ", indent=""))


def _estimate_vs_actual(e: Entry):
    """The job's headline figures side by side: what was planned, what happened."""
    est, rec = e.job.estimate, e.rec
    table = _table("Estimate vs actual")
    for column in ("", "estimate", "actual"):
        table.add_column(column, justify="right" if column else "left", overflow="fold")
    table.add_row("where", placement_label(est, with_price=False),
                  ", ".join(sorted({placement_label(a, with_price=False) for a in e.attempts})) or "-")
    table.add_row("$/h", f"${est.price_per_hour:,.4f}",
                  ", ".join(sorted({f"${a.price_per_hour:,.4f}" for a in e.attempts})) or "-")
    table.add_row("tokens", f"{est.total_tokens:,}", f"{rec.tokens:,}" if rec.tokens is not None else "-")
    table.add_row("tokens/s", f"{est.tokens_per_second:,.0f}",
                  f"{rec.tokens_per_second:,.0f}" if rec.tokens_per_second is not None else "-")
    table.add_row("execution", _execution_text(est),
                  ", ".join(dict.fromkeys(_execution_text(a) for a in e.attempts if a.micro_batch is not None)) or "-")
    table.add_row("hours", f"{rec.estimate_hours:.4f}", f"{float(rec.actual_hours):.4f}")
    table.add_row("attempts / preemptions", "1", f"{len(rec.attempts)} / {rec.preemptions}")
    table.add_row("cost", usd(rec.estimate_cost), usd(rec.actual_cost) + (" so far" if rec.open else ""))
    return table


def _place_in_words(a) -> str:
    """An attempt or estimate's place in full words: aws/us-east-1 1xA10G on-demand."""
    return f"{a.provider}/{a.region} {a.gpu_count}x{a.gpu} {'spot' if a.spot else 'on-demand'}"


def _priced(snapshot: str) -> str:
    """Where the estimate's prices came from, as a phrase: a catalog's read dates, or this machine's rate."""
    return "priced at the hourly rate given for this machine" if snapshot == "local price" else snapshot


def _print_story(console, story: str) -> None:
    """The variance story, one clause a line (`+$0.40 price (...)`), a long clause wrapped under itself."""
    import re

    from rich.padding import Padding
    from rich.text import Text

    head, _, rest = story.partition(": ")
    console.print(Text(head + (":" if rest else "")))
    for clause in (re.split(r"(?<=\)), ", rest) if rest else []):
        console.print(Padding(Text(clause), (0, 0, 0, 2)))


def render_job(console, e: Entry) -> None:
    from rich.markup import escape

    job, est, rec = e.job, e.job.estimate, e.rec
    width = console.width
    console.print(phrases([f"[bold]{job.id}[/]  {job.status} on {job.backend}",
                           f"({escape(job.external_id)})" if job.external_id else ""], width, sep=" "), highlight=False)
    console.print(phrases([f"{escape(job.model)} {job.method}", f"spec sha256 {job.spec_hash[:12]}",
                           f"submitted {job.created_at:%Y-%m-%d %H:%M} UTC"], width, sep=", "), highlight=False)
    if job.failure_reason:
        console.print(f"reason: {escape(job.failure_reason)}", highlight=False)
    console.print(phrases([f"planned: {_place_in_words(est)} at {per_hour(est.price_per_hour)}",
                           f"{est.tokens_per_second:,.0f} tokens/s",
                           f"{est.hours:.3f} h compute + {est.preemption_overhead_hours:.3f} h preemption = {usd(rec.estimate_cost)}",
                           f"option {est.chosen_rank} of {len(est.plan.get('options', []))}, {escape(_priced(est.catalog_snapshot))}"],
                          width, sep=", "), highlight=False)
    if job.budget is not None or e.budget_changes:
        changes = [f"raised from {usd_exact(b.old_budget) if b.old_budget is not None else 'none'} "
                   f"at {usd(b.spent)} spent ({b.time:%Y-%m-%d %H:%M})" for b in e.budget_changes]
        console.print(phrases([f"budget: {usd_exact(job.budget) if job.budget is not None else 'none'}", *changes],
                              width, sep="; "), highlight=False)
    console.print()
    console.print(_estimate_vs_actual(e))
    console.print("[bold]Attempts[/] (UTC)" if e.attempts else "no attempts recorded yet")
    for a, c, cents in zip(e.attempts, rec.attempts, e.attempt_cents):
        end = "now" if a.ended_at is None else f"{a.ended_at:%H:%M:%S}"
        console.print(f"  {a.n}  {a.started_at:%Y-%m-%d %H:%M:%S} -> {end}  {_place_in_words(a)}", highlight=False)
        facts = [f"{float(c.hours):.3f} h at {per_hour(a.price_per_hour)}: {usd(cents)}", a.end_reason or "running"]
        if a.resumed_from_step is not None:
            facts.append(f"resumed from step {a.resumed_from_step}")
        if c.lost_hours:
            parts = [f"{float(h):.3f} h {name}" for name, h in (("restart", c.restart_hours), ("rework", c.rework_hours)) if h]
            facts.append(f"lost {float(c.lost_hours):.3f} h ({', '.join(parts)})")
        if a.tokens is not None:
            facts.append(f"{a.tokens:,} tokens")
        if a.detail:
            facts.append(escape(a.detail))
        console.print(phrases(facts, width - 5, sep="; ", indent="     ").replace("", "     ", 1), highlight=False)
        for deviation in e.deviations.get(a.n, []):
            console.print(f"     deviated from the plan ({escape(str(deviation['kind']))}): {escape(str(deviation['reason']))}",
                          highlight=False)
    for c in e.controller[-1:]:
        end = "now" if c.ended_at is None else f"{c.ended_at:%H:%M:%S}"
        where = f"{c.provider}/{c.region} {c.instance_type or ''}".rstrip()
        console.print(f"  controller  {c.started_at:%Y-%m-%d %H:%M:%S} -> {end}  {escape(where)}", highlight=False)
        facts = [f"{float(rec.controller_hours):.3f} h at {per_hour(c.price_per_hour)}: {usd(e.controller_cents)}",
                 "SkyPilot's jobs controller, not in the estimate", escape(c.detail or "")]
        console.print(phrases(facts, width - 5, sep="; ", indent="     ").replace("", "     ", 1), highlight=False)
    shares = [*e.attempt_cents, *([e.controller_cents] if e.controller else [])]
    if len(shares) > 1:
        console.print(f"     {' + '.join(usd(x) for x in shares)} = {usd(rec.actual_cost)}", highlight=False)
    if e.checkpoints:
        console.print()
        console.print(checkpoint_table(e.job, e.checkpoints))
    console.print()
    _print_story(console, rec.story())


def print_job(console, ledger: "Ledger", job_id: str, now: Optional[datetime] = None) -> None:
    """One job's entry, read from the ledger: what `spotune ledger JOB` shows."""
    job = ledger.get_job(job_id)
    render_job(console, build_entries(ledger, [job], now or datetime.now(timezone.utc))[0])
