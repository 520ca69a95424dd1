"""Watching a submitted job: each tick mirrors the backend into the ledger and guards the budget.

The backend owns recovery; this module observes. Each tick polls the backend for the whole
attempt history and upserts it into the ledger (keyed by job and attempt number), ingests the
recipe's events.jsonl from where it stopped, and mirrors the backend's state into the job's
status. Because every write is idempotent, a CLI that died can re-attach (`resume`) from the
ledger alone (backend name + external id) and nothing is lost or counted twice.

The budget guard runs on the same tick: spent so far (sum of attempt wall hours x price) plus the
projected remaining cost (remaining tokens at the measured tokens/s x price) is compared with
`constraints.budget`, and the job is stopped with a checkpoint before it would pass it.

A tick's cost is flat in the length of the job: events are ingested from a stored byte offset, spend
comes from the attempts alone (`reconcile.spend`, the very sum reconcile reports as actual), and progress
from a few indexed reads of the latest rows (`Ledger.latest_progress`), never from every sample.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from contract.backend import TERMINAL_STATES as BACKEND_TERMINAL
from contract.events import OVER_BUDGET
from orchestrator.jobs import JobError, backend_errors, make_backend, read_intent

if TYPE_CHECKING:
    from datetime import datetime

    from contract.backend import Backend, Observation
    from orchestrator.ledger import JobRecord, LatestProgress, Ledger

# Throughput for the budget projection: the median of the latest few step samples, so one slow
# step (a checkpoint, a warm-up) does not stop a job that is within budget.
THROUGHPUT_WINDOW = 5

@dataclass(frozen=True)
class Progress:
    """What the recipe's events say about the job as a whole."""

    step: Optional[int] = None
    total_steps: Optional[int] = None
    tokens: Optional[int] = None
    total_tokens: Optional[int] = None
    tokens_per_second: Optional[float] = None
    loss: Optional[float] = None
    started_attempts: frozenset = frozenset()   # attempts whose recipe has logged `start`


@dataclass(frozen=True)
class Tick:
    """One watch tick as the ledger now records it: what the CLI renders."""

    job: "JobRecord"
    attempts: list
    progress: Progress
    spent: Decimal
    projected: Optional[Decimal]          # spent + remaining at measured throughput
    backend_state: str = "pending"        # what the backend itself says (contract.backend.JobState)
    detail: Optional[str] = None

    @property
    def done(self) -> bool:
        from orchestrator.ledger_tables import TERMINAL_STATUSES

        return self.job.status in TERMINAL_STATUSES


def read_progress(latest: "LatestProgress") -> Progress:
    """Progress from the latest rows: totals from the latest `start`, step, tokens and loss from the
    latest sample, tokens/s the median of its attempt's latest THROUGHPUT_WINDOW rates."""
    totals = latest.start.payload if latest.start is not None else {}
    progress = Progress(total_steps=totals.get("total_steps"), total_tokens=totals.get("total_tokens"),
                        started_attempts=latest.started_attempts)
    if latest.sample is None:
        return progress
    rates = latest.recent_tokens_per_second[-THROUGHPUT_WINDOW:]
    return dataclasses.replace(progress, step=latest.sample.step, tokens=latest.sample.tokens, loss=latest.sample.loss,
                               tokens_per_second=statistics.median(rates) if rates else None)


def project_cost(spent: Decimal, progress: Progress, price_per_hour: Decimal) -> Optional[Decimal]:
    if not (progress.tokens_per_second and progress.total_tokens and progress.tokens is not None):
        return None
    remaining_tokens = max(0, progress.total_tokens - progress.tokens)
    remaining_hours = Decimal(str(remaining_tokens / progress.tokens_per_second)) / Decimal(3600)
    return spent + remaining_hours * price_per_hour


class Watcher:
    """Mirrors one job's backend into the ledger, tick by tick, until it ends."""

    def __init__(self, ledger: "Ledger", job_id: str, backend: "Backend", external_id: str,
                 poll_seconds: Optional[float] = None):
        self.ledger = ledger
        self.job_id = job_id
        self.backend = backend
        self.external_id = external_id
        self.poll_seconds = poll_seconds or backend.poll_seconds

    def sync(self) -> "Observation":
        """One poll, written to the ledger. Safe to repeat and to run from several processes.

        Whoever stopped a job for its budget, the ledger says `over_budget`: this watcher (status set
        before its cancel), the local supervisor (its own state) or the node (the recipe's
        `over_budget` event, with whatever exit the backend reports)."""
        with backend_errors(self.job_id):
            observation = self.backend.poll(self.external_id)
        if observation.events_path is not None and Path(observation.events_path).exists():
            self.ledger.ingest_events(self.job_id, observation.events_path)
        stopping_for_budget = self.ledger.get_job(self.job_id).status == "over_budget"
        node_stops = {e.attempt: e.payload for e in self.ledger.run_events_named(self.job_id, OVER_BUDGET)}
        for attempt in observation.attempts:
            stopped_here = attempt.n in node_stops and attempt.end_reason in ("failed", "cancelled")
            if stopped_here or (stopping_for_budget and attempt.end_reason == "cancelled"):
                attempt = dataclasses.replace(attempt, end_reason="over_budget")
            self.ledger.upsert_attempt(self.job_id, attempt)
        # Only the last attempt's stop ends the job: a job continued with a higher budget goes on.
        node_stop = node_stops.get(observation.attempts[-1].n) if observation.attempts else None
        self._mirror_status(observation, stopping_for_budget, node_stop)
        return observation

    def _mirror_status(self, observation: "Observation", stopping_for_budget: bool, node_stop: Optional[dict]) -> None:
        job = self.ledger.get_job(self.job_id)
        if node_stop is not None and observation.state in BACKEND_TERMINAL and observation.state != "succeeded":
            if job.status != "over_budget":
                self.ledger.set_status(self.job_id, "over_budget", str(node_stop.get("message") or "over budget"))
            return
        if stopping_for_budget and observation.state != "succeeded":
            if observation.state == "failed" and job.status != "failed":
                self.ledger.set_status(self.job_id, "failed", observation.detail)
            return  # stays over_budget while the checkpoint is written, and after
        reason = observation.detail if observation.state in ("failed", "cancelled", "over_budget") else None
        if job.status != observation.state:
            self.ledger.set_status(self.job_id, observation.state, reason)

    def tick(self, now: Optional["datetime"] = None) -> Tick:
        """One sync, then spend and progress as of `now` (default: the moment after the sync)."""
        from orchestrator.reconcile import spend

        observation = self.sync()
        job = self.ledger.get_job(self.job_id)
        attempts = self.ledger.attempts(self.job_id)
        spent = spend(attempts, now)
        progress = read_progress(self.ledger.latest_progress(self.job_id, THROUGHPUT_WINDOW))
        price = Decimal(attempts[-1].price_per_hour) if attempts else job.estimate.price_per_hour
        projected = project_cost(spent, progress, price)
        if observation.state not in BACKEND_TERMINAL and job.status != "over_budget":
            self._guard_budget(job, spent, projected)
            job = self.ledger.get_job(self.job_id)
        return Tick(job=job, attempts=attempts, progress=progress, spent=spent, projected=projected,
                    backend_state=observation.state, detail=observation.detail)

    def _guard_budget(self, job: "JobRecord", spent: Decimal, projected: Optional[Decimal]) -> None:
        if job.budget is None:
            return
        budget = Decimal(job.budget)
        worst = max(spent, projected or Decimal(0))
        if worst <= budget:
            return
        from orchestrator.format import usd_exact, usd_fine

        # The budget as it was given ($0.0001 stays $0.0001), amounts to the cent or finer where small.
        if projected is not None and projected > spent:
            reason = (f"over budget: spent {usd_fine(spent)} + projected remaining {usd_fine(projected - spent)} "
                      f"would pass the budget of {usd_exact(budget)}; stopped with a checkpoint")
        else:
            reason = f"over budget: spent {usd_fine(spent)} passes the budget of {usd_exact(budget)}; stopped with a checkpoint"
        # Status first: a watcher that dies right after the cancel still knows why it stopped.
        self.ledger.set_status(self.job_id, "over_budget", reason)
        with backend_errors(self.job_id):
            self.backend.cancel(self.external_id, graceful=True)

    def watch(self, on_tick: Optional[Callable[[Tick], None]] = None, timeout: Optional[float] = None) -> Tick:
        """Tick until the backend says the job ended (or `timeout` seconds pass)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            tick = self.tick()
            if on_tick is not None:
                on_tick(tick)
            # Both ended: an over-budget stop is recorded before the checkpoint is written.
            if tick.done and tick.backend_state in BACKEND_TERMINAL:
                return tick
            if deadline is not None and time.monotonic() > deadline:
                return tick
            time.sleep(self.poll_seconds)


def _backend_for(job: "JobRecord", backend: Optional["Backend"], state_dir: Optional[Path]) -> "Backend":
    if backend is not None:
        return backend
    from orchestrator.settings import state_dir as default_state_dir

    return make_backend(job.backend, state_dir or default_state_dir())


def recover_launch(ledger: "Ledger", job: "JobRecord", backend: "Backend", *, submit: bool = False) -> Optional[str]:
    """The external id of a job whose launch was cut short before it was recorded, now recorded.

    Write-ahead makes this possible: the job's run dir is in the ledger before anything starts, and
    the launch intent is in the run dir before the backend starts anything. The backend is asked
    whether it started the job (`find`); with `submit`, a job it never started is submitted now from
    its intent (only where `find` can say so for sure: a second cloud submit would be paid twice).
    None: nothing was started (or the backend cannot tell)."""
    if job.external_id is not None:
        return job.external_id
    if job.run_dir is None or job.status in BACKEND_TERMINAL:
        return None
    find = getattr(backend, "find", None)
    if find is None:
        return None
    with backend_errors(job.id):
        external_id = find(job.id, Path(job.run_dir))
        if external_id is None and submit and (request := read_intent(Path(job.run_dir))) is not None:
            external_id = backend.submit(request)
    if external_id is not None:
        ledger.set_external_id(job.id, external_id)
    return external_id


def _never_started(job: "JobRecord", backend: "Backend") -> str:
    if job.run_dir is not None and getattr(backend, "find", None) is None:
        return (f"job {job.id}: its launch was cut short and {job.backend} cannot look a job up by its id; "
                f"check the backend for a job named {job.id}, then `spotune cancel {job.id}`")
    return f"job {job.id} was never submitted to {job.backend} (status {job.status}); nothing to attach to"


def attach(ledger: "Ledger", job_ref: str, backend: Optional["Backend"] = None,
           poll_seconds: Optional[float] = None, state_dir: Optional[Path] = None) -> Watcher:
    """A watcher for a recorded job, rebuilt from the ledger alone (backend name + external id, or
    the run dir of a launch that was cut short)."""
    job = ledger.get_job(job_ref)
    backend = _backend_for(job, backend, state_dir)
    external_id = recover_launch(ledger, job, backend)
    if external_id is None:
        raise JobError(_never_started(job, backend))
    return Watcher(ledger, job.id, backend, external_id, poll_seconds)


def reattach(ledger: "Ledger", job_ref: str, backend: Optional["Backend"] = None, poll_seconds: Optional[float] = None,
             state_dir: Optional[Path] = None, say: Callable[[str], None] = lambda line: None) -> Watcher:
    """`spotune resume`: a watcher for the job, after settling whatever a killed process left.

    A launch cut short before the backend started anything is submitted now from its intent; one cut
    short before the intent was written is recorded as failed (nothing ran, nothing was spent). A job whose
    recovery owner died (the local supervisor) gets a new one, which goes on from the last checkpoint."""
    job = ledger.get_job(job_ref)
    backend = _backend_for(job, backend, state_dir)
    had_id = job.external_id is not None
    external_id = recover_launch(ledger, job, backend, submit=True)
    if external_id is None:
        if job.run_dir is not None and job.status == "pending" and getattr(backend, "find", None) is not None:
            ledger.set_status(job.id, "failed", "launch interrupted before anything was started; nothing ran")
            raise JobError(f"job {job.id}: its launch was interrupted before anything was started; recorded as "
                           f"failed (nothing ran, nothing was spent): launch it again")
        raise JobError(_never_started(job, backend))
    if not had_id:
        say(f"recovered the launch of {job.id} that was cut short: {external_id}")
    restart = getattr(backend, "restart", None)
    if restart is not None and job.status != "succeeded":
        with backend_errors(job.id):
            if restart(external_id):
                say(f"the job's supervisor had died: started a new one, resuming from the last checkpoint")
    return Watcher(ledger, job.id, backend, external_id, poll_seconds)


def sync_unsettled(ledger: "Ledger", state_dir: Optional[Path] = None, jobs: Optional[list] = None) -> int:
    """Bring every job (of `jobs`, default all) the ledger does not know to have ended up to date with
    its backend, which is what `spotune status` does first: a job left running by a CLI that died, or
    by a ledger that could not be written, is settled from its run's own records, and a launch cut
    short is found by its run dir. A backend that cannot answer leaves what the ledger last knew.
    Returns how many jobs were synced."""
    from contract.errors import UserError
    from orchestrator.ledger import LedgerError
    from orchestrator.ledger_tables import TERMINAL_STATUSES

    synced = 0
    for job in ledger.list_jobs() if jobs is None else jobs:
        if job.status in TERMINAL_STATUSES or (job.external_id is None and job.run_dir is None):
            continue
        try:
            attach(ledger, job.id, state_dir=state_dir).sync()
            synced += 1
        except LedgerError:
            raise  # a ledger that cannot be written is the user's to know, not one job's
        except UserError:
            pass
    return synced


def cancel_job(ledger: "Ledger", job_ref: str, backend: Optional["Backend"] = None, graceful: bool = True,
               wait_seconds: float = 300.0, on_tick: Optional[Callable[[Tick], None]] = None,
               state_dir: Optional[Path] = None) -> Tick:
    """Ask the backend to checkpoint and stop, then watch until it has. A job whose launch was cut
    short before anything started is settled as cancelled at once."""
    job = ledger.get_job(job_ref)
    backend = _backend_for(job, backend, state_dir)
    external_id = recover_launch(ledger, job, backend)
    if external_id is None:
        if job.run_dir is None or getattr(backend, "find", None) is None:
            raise JobError(_never_started(job, backend))
        ledger.set_status(job.id, "cancelled", "cancelled before anything was started")
        return Tick(job=ledger.get_job(job.id), attempts=ledger.attempts(job.id), progress=Progress(),
                    spent=Decimal(0), projected=None, backend_state="cancelled")
    watcher = Watcher(ledger, job.id, backend, external_id)
    with backend_errors(watcher.job_id):
        watcher.backend.cancel(watcher.external_id, graceful=graceful)
    return watcher.watch(on_tick=on_tick, timeout=wait_seconds)
