"""The ledger report's figures: each job's Entry (its attempts, reconciliation, and cents that add up
to its actual cost), the totals over jobs and by provider, GPU, method and month, and their JSON and
CSV forms. report.py prints them, report_plot.py and report_html.py draw them.

Figures that are shown together add up as shown: each attempt's cost is rounded so that the
attempts add up to the job's actual cost (`format.cents_that_add_up`), totals are sums of the rows
shown, and percentages come from the exact amounts, never from rounded cents.
"""
from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from orchestrator.format import cents_that_add_up
from orchestrator.quote import money_json
from orchestrator.report_checkpoints import existing_checkpoints

if TYPE_CHECKING:
    from orchestrator.ledger import AttemptRecord, JobRecord, Ledger
    from orchestrator.reconcile import Reconciliation

SPLIT = ("price", "throughput", "preemption")
# The fourth part of the variance: the backend's jobs controller (SkyPilot), which no estimate plans.
CONTROLLER = "controller"
GROUPS = ("provider", "gpu", "method", "month")
CSV_COLUMNS = ("id", "name", "status", "backend", "provider", "gpu", "method", "created_at", "estimate_cost",
               "actual_cost", "variance", "price", "throughput", "preemption", CONTROLLER, "estimate_hours", "actual_hours",
               "tokens", "tokens_per_second")


def _iso(when: Optional[datetime]) -> Optional[str]:
    return None if when is None else when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _percent(new: Decimal, old: Decimal) -> Optional[float]:
    """(new - old) / old in percent, from the exact amounts; None when old is zero."""
    return None if not old else round(float((Decimal(new) - Decimal(old)) / Decimal(old) * 100), 4)


def _execution(record) -> dict:
    """The execution config an estimate planned or an attempt ran (None where not known)."""
    from orchestrator.ledger_tables import EXECUTION_COLUMNS

    return {name: getattr(record, name) for name in EXECUTION_COLUMNS}


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


PARTS = (*SPLIT, CONTROLLER)


@dataclass(frozen=True)
class _Figures:
    """One job's money in one kind of figure: exact micro-dollars (--json) or the cents its rows show."""

    estimate: Decimal
    actual: Decimal
    parts: dict[str, Decimal]     # the variance split, PARTS
    attempts: Sequence[Decimal]   # each of Entry.attempts
    controller: Decimal


def _exact(e: Entry) -> _Figures:
    x = e.rec.exact
    return _Figures(x.estimate, x.actual, {p: getattr(x, p) for p in PARTS}, [c.billed for c in e.rec.attempts],
                    x.controller)


def _shown(e: Entry) -> _Figures:
    rec = e.rec
    return _Figures(rec.estimate_cost, rec.actual_cost, {p: getattr(rec, p) for p in PARTS}, e.attempt_cents,
                    e.controller_cents)


def _sums(entries: list[Entry], figures: Callable[[Entry], _Figures], out: Callable[[Decimal], object]) -> dict:
    """Sums over all jobs and by provider, GPU, method and month of one kind of figure, each written
    by `out`. Estimates count where the job was planned to run, actual spend where each attempt
    really ran (a recovery may change provider). The percentage comes from the exact sums."""
    zero = Decimal(0)
    overall = {"estimate": zero, "actual": zero, **{p: zero for p in PARTS}}
    groups: dict[str, dict[str, dict]] = {g: defaultdict(lambda: {"jobs": 0, "estimate": zero, "actual": zero}) for g in GROUPS}
    exact = {"estimate": zero, "actual": zero}
    for e in entries:
        f, job = figures(e), e.job
        overall["estimate"] += f.estimate
        overall["actual"] += f.actual
        for part in PARTS:
            overall[part] += f.parts[part]
        exact["estimate"] += e.rec.exact.estimate
        exact["actual"] += e.rec.exact.actual
        planned = {"provider": job.estimate.provider, "gpu": job.estimate.gpu, "method": job.method,
                   "month": f"{job.created_at:%Y-%m}"}
        for group, key in planned.items():
            groups[group][key]["jobs"] += 1
            groups[group][key]["estimate"] += f.estimate
        groups["method"][job.method]["actual"] += f.actual
        groups["month"][planned["month"]]["actual"] += f.actual
        for attempt, cost in zip(e.attempts, f.attempts):
            groups["provider"][attempt.provider]["actual"] += cost
            groups["gpu"][attempt.gpu]["actual"] += cost
        for line in e.controller[-1:]:
            groups["provider"][line.provider]["actual"] += f.controller
            groups["gpu"]["(jobs controller)"]["actual"] += f.controller
    result = {"jobs": len(entries), "estimate": out(overall["estimate"]), "actual": out(overall["actual"]),
              "variance": {"total": out(overall["actual"] - overall["estimate"]), **{p: out(overall[p]) for p in PARTS},
                           "percent": _percent(exact["actual"], exact["estimate"])}}
    for group in GROUPS:
        result[f"by_{group}"] = [{group: key, "jobs": g["jobs"], "estimate": out(g["estimate"]), "actual": out(g["actual"]),
                                  "variance": out(g["actual"] - g["estimate"])}
                                 for key, g in sorted(groups[group].items())]
    return result


def totals(entries: list[Entry]) -> dict:
    """`--json` totals: exact sums of the exact figures the job rows carry (micro-dollar strings)."""
    return _sums(entries, _exact, money_json)


def shown_totals(entries: list[Entry]) -> dict:
    """The tables' totals: sums of the cents the job rows show, so a total is the sum of its rows."""
    return _sums(entries, _shown, float)


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
