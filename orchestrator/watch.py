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

from orchestrator.jobs import JobError, backend_errors, make_backend

if TYPE_CHECKING:
    from datetime import datetime

    from contract.backend import Backend, Observation
    from orchestrator.ledger import JobRecord, LatestProgress, Ledger

BACKEND_TERMINAL = ("succeeded", "failed", "cancelled")
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
        """One poll, written to the ledger. Safe to repeat and to run from several processes."""
        with backend_errors(self.job_id):
            observation = self.backend.poll(self.external_id)
        stopping_for_budget = self.ledger.get_job(self.job_id).status == "over_budget"
        for attempt in observation.attempts:
            if stopping_for_budget and attempt.end_reason == "cancelled":
                attempt = dataclasses.replace(attempt, end_reason="over_budget")
            self.ledger.upsert_attempt(self.job_id, attempt)
        if observation.events_path is not None and Path(observation.events_path).exists():
            self.ledger.ingest_events(self.job_id, observation.events_path)
        self._mirror_status(observation, stopping_for_budget)
        return observation

    def _mirror_status(self, observation: "Observation", stopping_for_budget: bool) -> None:
        job = self.ledger.get_job(self.job_id)
        if stopping_for_budget and observation.state != "succeeded":
            if observation.state == "failed" and job.status != "failed":
                self.ledger.set_status(self.job_id, "failed", observation.detail)
            return  # stays over_budget while the checkpoint is written, and after
        reason = observation.detail if observation.state in ("failed", "cancelled") else None
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
        if projected is not None and projected > spent:
            reason = (f"over budget: spent ${spent:.2f} + projected remaining ${projected - spent:.2f} "
                      f"would pass the budget of ${budget:.2f}; stopped with a checkpoint")
        else:
            reason = f"over budget: spent ${spent:.2f} passes the budget of ${budget:.2f}; stopped with a checkpoint"
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


def attach(ledger: "Ledger", job_ref: str, backend: Optional["Backend"] = None,
           poll_seconds: Optional[float] = None, state_dir: Optional[Path] = None) -> Watcher:
    """A watcher for a recorded job, rebuilt from the ledger alone (backend name + external id)."""
    job = ledger.get_job(job_ref)
    if job.external_id is None:
        raise JobError(f"job {job.id} was never submitted to {job.backend} (status {job.status}); nothing to attach to")
    if backend is None:
        from orchestrator.settings import state_dir as default_state_dir

        backend = make_backend(job.backend, state_dir or default_state_dir())
    return Watcher(ledger, job.id, backend, job.external_id, poll_seconds)


def cancel_job(ledger: "Ledger", job_ref: str, backend: Optional["Backend"] = None, graceful: bool = True,
               wait_seconds: float = 300.0, on_tick: Optional[Callable[[Tick], None]] = None,
               state_dir: Optional[Path] = None) -> Tick:
    """Ask the backend to checkpoint and stop, then watch until it has."""
    watcher = attach(ledger, job_ref, backend, state_dir=state_dir)
    with backend_errors(watcher.job_id):
        watcher.backend.cancel(watcher.external_id, graceful=graceful)
    return watcher.watch(on_tick=on_tick, timeout=wait_seconds)
