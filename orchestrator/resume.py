"""Continuing a stopped job: `spotune resume JOB [--budget USD]` on a job that was cancelled or
stopped over its budget starts a new attempt from the last verified checkpoint, under the same job
and the same estimate (never re-planned, so the audit still compares against what was promised).
A raised budget is put in force and recorded (`Ledger.change_budget`): the ledger keeps what the
job was first allowed to spend, and when and by how much that changed.

Backends that can continue a stopped job offer `continue_stopped(external_id, budget=...)`
(the local backend restarts its supervisor on the same run dir, so attempts keep their numbers);
for the others the answer is one line saying so.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from orchestrator.format import usd_exact, usd_fine
from orchestrator.jobs import JobError, backend_errors

if TYPE_CHECKING:
    from orchestrator.ledger import Ledger
    from orchestrator.watch import Watcher

CONTINUABLE = ("cancelled", "over_budget")


@dataclass(frozen=True)
class Continued:
    watcher: "Watcher"
    spent: Decimal
    old_budget: Optional[Decimal]
    new_budget: Optional[Decimal]
    from_step: Optional[int]       # the newest checkpoint the recipe will resume from, if any


def continue_stopped(ledger: "Ledger", job_ref: str, budget: Optional[Decimal], state_dir: Optional[Path],
                     poll_seconds: Optional[float] = None) -> Continued:
    from contract.backend import TERMINAL_STATES
    from orchestrator.reconcile import spend
    from orchestrator.report_checkpoints import existing_checkpoints
    from orchestrator.watch import attach

    job = ledger.get_job(job_ref)
    if job.status not in CONTINUABLE:
        raise JobError(f"{job.id} is {job.status}; only a cancelled or over-budget job can be continued")
    watcher = attach(ledger, job.id, state_dir=state_dir)
    go_on = getattr(watcher.backend, "continue_stopped", None)
    if go_on is None:
        raise JobError(f"{job.id}: the {watcher.backend.name} backend cannot continue a stopped job yet; "
                       "launch the spec again to start a new job")
    observation = watcher.sync()  # the stop's last events and attempt, before anything new starts
    if observation.state not in TERMINAL_STATES:
        raise JobError(f"{job.id} is still stopping ({observation.state}); try again once it has stopped")
    spent = spend(ledger.attempts(job.id))
    if job.status == "over_budget" and (budget is None or (job.budget is not None and budget <= job.budget)):
        allowed = usd_exact(job.budget) if job.budget is not None else "its budget"
        raise JobError(f"{job.id} stopped over its budget of {allowed} after spending {usd_fine(spent)}; "
                       f"continue it with a higher one: spotune resume {job.id} --budget USD")
    new_budget = job.budget if budget is None else budget
    if new_budget is not None and new_budget <= spent:
        raise JobError(f"a budget of {usd_exact(new_budget)} is not more than the {usd_fine(spent)} "
                       f"{job.id} has already spent")
    checkpoints = existing_checkpoints(job, ledger.checkpoints(job.id), ledger.run_events(job.id))
    from_step = max((c.step for c in checkpoints), default=None)
    with backend_errors(job.id):
        external_id = go_on(job.external_id, budget=None if new_budget is None else str(new_budget))
    if budget is not None and budget != job.budget:
        ledger.change_budget(job.id, budget, spent, f"resume --budget: continued after {job.status}")
    if external_id != job.external_id:
        ledger.set_external_id(job.id, external_id)
    ledger.set_status(job.id, "pending", "")  # the stop's reason belongs to the attempt that stopped
    return Continued(attach(ledger, job.id, poll_seconds=poll_seconds, state_dir=state_dir), spent, job.budget,
                     new_budget, from_step)
