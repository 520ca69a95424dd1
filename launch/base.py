"""The one protocol every compute backend speaks: submit / poll / cancel / logs.

A backend owns recovery (SkyPilot's managed jobs, the local supervisor, Ray's job driver);
the orchestrator only observes. `poll` returns the whole attempt history the backend knows,
and the orchestrator upserts it into the ledger keyed by (job, attempt number), so a CLI
that died and re-attached neither loses nor double-counts an attempt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Iterator, Literal, Optional, Protocol

JobState = Literal["pending", "running", "recovering", "succeeded", "failed", "cancelled"]
EndReason = Literal["finished", "preempted", "failed", "cancelled", "over_budget"]
END_REASONS = ("finished", "preempted", "failed", "cancelled", "over_budget")


class BackendError(RuntimeError):
    """A backend could not do what was asked; the message is the one line the user sees."""


def first_line(e: BaseException) -> str:
    """An SDK exception as one line for a BackendError (colour codes dropped)."""
    text = str(e).strip() or type(e).__name__
    return re.sub(r"\x1b\[[0-9;]*m", "", text.splitlines()[0])


@dataclass(frozen=True)
class Placement:
    """Where an attempt really ran, with the price of that offer (whole instance, USD/h)."""

    provider: str
    region: str
    gpu: str
    gpu_count: int
    spot: bool
    price_per_hour: Decimal
    instance_type: Optional[str] = None


@dataclass(frozen=True)
class LaunchRequest:
    job_id: str
    spec_path: Path              # the spec as submitted, copied into the run dir
    run_dir: Path                # <state>/runs/<job_id>: events.jsonl, checkpoints/, logs
    placements: tuple[Placement, ...]  # allowed placements, cheapest expected cost first
    env: dict = field(default_factory=dict)  # non-secret environment only


@dataclass(frozen=True)
class ObservedAttempt:
    n: int                       # 1-based, stable across polls
    placement: Placement
    started_at: datetime         # UTC
    ended_at: Optional[datetime] = None
    end_reason: Optional[EndReason] = None
    external_id: Optional[str] = None
    detail: Optional[str] = None  # e.g. exit code, signal, the backend's failure status


@dataclass(frozen=True)
class Observation:
    state: JobState
    attempts: tuple[ObservedAttempt, ...]
    detail: Optional[str] = None          # why it failed, in one line
    events_path: Optional[Path] = None    # a local copy of the recipe's events.jsonl


class Backend(Protocol):
    name: str

    def submit(self, request: LaunchRequest) -> str:
        """Start the job; return the backend's external id. Must not block on training."""

    def poll(self, external_id: str) -> Observation: ...

    def cancel(self, external_id: str, *, graceful: bool = True) -> None:
        """graceful: ask the recipe to checkpoint first (SIGTERM), then stop."""

    def logs(self, external_id: str, *, follow: bool = False) -> Iterator[str]: ...
