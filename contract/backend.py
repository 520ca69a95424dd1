"""The one protocol every compute backend speaks, and the values that cross it.

A backend owns recovery (the local supervisor, SkyPilot's managed jobs, Ray's job driver); the
orchestrator only observes. `poll` returns the whole attempt history the backend knows, and the
orchestrator upserts it into the ledger keyed by (job, attempt number), so a CLI that died and
re-attached neither loses nor double-counts an attempt.

Everything a caller needs to know about a backend is on the protocol (how it is priced, how
often to poll it, which options it takes, what a dry run would do), so no caller asks which
backend it holds.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Mapping, Optional, Protocol, Sequence

from contract.errors import UserError
from contract.placement import Placement
from contract.spec import JobSpec

# over_budget: the backend (the local supervisor) or the node stopped the job with a checkpoint
# because running on would pass the spec's budget.
JobState = Literal["pending", "running", "recovering", "succeeded", "failed", "cancelled", "over_budget"]
TERMINAL_STATES = ("succeeded", "failed", "cancelled", "over_budget")
EndReason = Literal["finished", "preempted", "failed", "cancelled", "over_budget"]
END_REASONS = ("finished", "preempted", "failed", "cancelled", "over_budget")
AttemptKind = Literal["training", "controller"]
CONTROLLER_ATTEMPT = 0  # the attempt number a controller line takes: attempts proper count from 1
# "catalog": the plan ranks cloud offers from the price catalog. "hourly": the job runs on
# hardware you already have (this machine, a Ray cluster), priced at the spec's local.price_per_hour.
Pricing = Literal["catalog", "hourly"]


class BackendError(RuntimeError):
    """A backend could not do what was asked; the message is the one line the user sees."""


def first_line(e: BaseException) -> str:
    """An SDK exception as one line for a BackendError (colour codes dropped)."""
    text = str(e).strip() or type(e).__name__
    return re.sub(r"\x1b\[[0-9;]*m", "", text.splitlines()[0])


@dataclass(frozen=True)
class LaunchRequest:
    job_id: str
    spec: JobSpec                # validated; the backend never re-parses a file
    node_spec: dict              # the spec as the node reads it (JobSpec.node_spec): written, not re-derived
    run_dir: Path                # <state>/runs/<job_id>: events.jsonl, checkpoints/, logs
    placements: tuple[Placement, ...]  # allowed placements, the chosen one first, then cheapest first
    env: dict = field(default_factory=dict)  # non-secret environment only
    # On-demand USD/h by cloud instance type, from the planner's catalog (the lowest over regions):
    # how a backend that finds its machines itself (a Ray cluster's nodes) prices a cloud instance.
    instance_prices: Mapping[str, Decimal] = field(default_factory=dict)


@dataclass(frozen=True)
class ObservedAttempt:
    n: int                       # 1-based, stable across polls
    placement: Placement
    started_at: datetime         # UTC
    ended_at: Optional[datetime] = None
    end_reason: Optional[EndReason] = None
    external_id: Optional[str] = None
    detail: Optional[str] = None  # e.g. exit code, signal, the backend's failure status
    # "training": an attempt at the job itself. "controller": what the backend's own machinery cost
    # over the job (SkyPilot's jobs controller VM), billed like an attempt but no attempt at training.
    kind: AttemptKind = "training"


@dataclass(frozen=True)
class Observation:
    state: JobState
    attempts: tuple[ObservedAttempt, ...]
    detail: Optional[str] = None          # why it failed, in one line
    events_path: Optional[Path] = None    # a local copy of the recipe's events.jsonl


@dataclass(frozen=True)
class Feasibility:
    """Which placements a backend can run a job on, and why not the others (each with one line)."""

    launchable: tuple[Placement, ...]
    rejected: tuple[tuple[Placement, str], ...] = ()


@dataclass(frozen=True)
class DeviceReport:
    """What an hourly-priced backend runs on, as the hardware names it (None: no GPU found)."""

    gpu: Optional[str]
    count: int                      # GPUs on each node
    vram_gib: Optional[float] = None
    nodes: int = 1                  # nodes of this hardware one job may span (a Ray cluster's)


class Backend(Protocol):
    name: ClassVar[str]
    pricing: ClassVar[Pricing]
    options: ClassVar[tuple[str, ...]]   # keyword options (CLI flags) this backend accepts
    poll_seconds: float                  # how often a watcher should poll it
    # The most nodes one job may span here; None: as many as the plan asks (the cloud's own checks,
    # such as SkyPilot's MULTI_NODE feature, still apply in feasible()). orchestrator/launchable.py
    # turns down options over it before anything is recorded.
    max_nodes: ClassVar[Optional[int]]

    def __init__(self, state_dir: Path, **options: Any) -> None: ...

    def device(self) -> DeviceReport:
        """Hourly-priced backends: the hardware a job would run on (catalog backends: none)."""

    def feasible(self, spec: JobSpec, placements: Sequence[Placement]) -> Feasibility:
        """Which of the plan's placements this backend can launch `spec` on, in their order, and
        the reason for each other one (a cloud that is not enabled, a feature the task needs that
        the cloud lacks). Asked before a job is recorded; starts nothing."""

    def describe(self, request: LaunchRequest) -> str:
        """What submit would do, for a dry run; starts nothing."""

    def submit(self, request: LaunchRequest) -> str:
        """Start the job; return the backend's external id. Must not block on training."""

    def poll(self, external_id: str) -> Observation: ...

    def cancel(self, external_id: str, *, graceful: bool = True) -> None:
        """graceful: ask the recipe to checkpoint first (SIGTERM), then stop."""

    def logs(self, external_id: str, *, follow: bool = False) -> Iterator[str]: ...

    def find(self, job_id: str, run_dir: Path) -> Optional[str]:
        """The external id of a job whose submit may have started but was never recorded (the
        launching CLI died in between), or None if nothing of it was started. Backends that cannot
        look a job up by its id leave this out; callers then say so."""

    def restart(self, external_id: str) -> bool:
        """Bring back the process that owns the job's recovery if it died without settling the job
        (the local supervisor was killed): the job goes on from its last checkpoint. False when
        nothing needed restarting. Backends whose recovery lives elsewhere leave this out."""


# Looked up by name and imported only when used: `spotune --help` must not import sky or ray.
BACKENDS = {
    "local": "launch.local:LocalBackend",
    "skypilot": "launch.skypilot:SkyPilotBackend",
    "ray": "launch.ray:RayBackend",
}


# The package each backend drives and the spotune extra that installs it: checked before the
# backend is built, so a missing one is one line saying what to install, not a traceback.
EXTRAS = {"skypilot": ("sky", "sky"), "ray": ("ray", "ray")}


class UnknownBackend(UserError):
    pass


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (not importable)
        return False


def backend_class(name: str) -> type:
    if name not in BACKENDS:
        raise UnknownBackend(f"unknown backend {name!r} (choose one of: {', '.join(BACKENDS)})")
    if name in EXTRAS and not _installed(EXTRAS[name][0]):
        raise UnknownBackend(f"the {name} backend needs the {EXTRAS[name][1]} extra: pip install 'spotune[{EXTRAS[name][1]}]'")
    module_name, class_name = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except ImportError as e:
        raise UnknownBackend(f"backend {name!r} is not available here: {e}") from None


def make_backend(name: str, state_dir: Path, **options: Any) -> Backend:
    """The backend called `name`, with the options the user set (None and False mean 'not set')."""
    cls = backend_class(name)
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    foreign = [k for k in given if k not in cls.options]
    if foreign:
        raise UnknownBackend(f"--{foreign[0].replace('_', '-')} does not apply to --backend {name}")
    return cls(Path(state_dir), **given)
